"""CMA-ES driver: sign convention, resume-equals-uninterrupted, bad input."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wmlib.config import EvolveConfig
from wmlib.controller import free_params, load_controller, n_params, to_flat
from wmlib.errors import WMError
from wmlib.evolve import controller_saver, evolve, history
from wmlib.files import read_jsonl

Z, H = 2, 3
N = n_params(Z, H)
TARGET = np.linspace(-0.5, 0.5, N)


def toy_fitness(key, solutions):
    """A 'return' that is highest at TARGET, with noise that depends on the key (like the dream)."""
    noise = 0.01 * jax.random.normal(key, (solutions.shape[0], 2))
    return -jnp.sum((jnp.asarray(solutions) - TARGET) ** 2, axis=1, keepdims=True) + noise


def cfg(**kw):
    return dataclasses.replace(EvolveConfig(popsize=8, repeats=2, sigma0=0.3, generations=30, real_every=0), **kw)


@pytest.mark.parametrize("optimizer", ["pycma", "evosax"])
def test_evolve_maximises_return(tmp_path, optimizer):
    result = evolve(toy_fitness, N, cfg(optimizer=optimizer), tmp_path,
                    on_best=controller_saver(tmp_path / "controller.eqx", Z, H), progress=False)
    start = -np.sum(TARGET**2)
    assert result.best_return > start / 4  # moved towards the maximum, not away from it
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["generation"] for r in records] == list(range(1, 31))
    assert records[-1]["best_so_far"] == pytest.approx(result.best_return)
    c, header = load_controller(tmp_path / "controller.eqx")
    np.testing.assert_allclose(np.asarray(to_flat(c)), result.best_params, rtol=1e-6, atol=1e-6)
    assert header["extra"]["dream_return"] == pytest.approx(result.best_return)


@pytest.mark.slow  # more than 10 s on 2 cores: left out of the quick unit run
@pytest.mark.parametrize("optimizer", ["pycma", "evosax"])
def test_resume_equals_uninterrupted(tmp_path, optimizer):
    straight = evolve(toy_fitness, N, cfg(optimizer=optimizer, generations=12), tmp_path / "a",
                      progress=False)
    evolve(toy_fitness, N, cfg(optimizer=optimizer, generations=5), tmp_path / "b", progress=False)
    resumed = evolve(toy_fitness, N, cfg(optimizer=optimizer, generations=12), tmp_path / "b",
                     progress=False)
    np.testing.assert_array_equal(resumed.best_params, straight.best_params)
    a = [r["sigma"] for r in read_jsonl(tmp_path / "a" / "metrics.jsonl")]
    b = [r["sigma"] for r in read_jsonl(tmp_path / "b" / "metrics.jsonl")]
    assert a == b and len(a) == 12


def test_on_best_sees_every_improvement_and_only_those(tmp_path):
    seen = []
    result = evolve(toy_fitness, N, cfg(generations=6), tmp_path,
                    on_best=lambda params, ret: seen.append((params.copy(), ret)), progress=False)
    assert seen and all(a[1] < b[1] for a, b in zip(seen, seen[1:]))
    np.testing.assert_array_equal(seen[-1][0], result.best_params)
    assert seen[-1][1] == result.best_return and not (tmp_path / "controller.eqx").exists()


def test_real_score_is_logged_beside_dream_score(tmp_path):
    seen = []

    def real_score(params):
        seen.append(params)
        return {"mean": 1.5, "std": 0.5, "scores": [1.0, 2.0]}

    evolve(toy_fitness, N, cfg(generations=4, real_every=2), tmp_path,
           real_score=real_score, progress=False)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert len(seen) == 2 and [("real_mean" in r) for r in records] == [False, True, False, True]


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="at least 3 for pycma"):
        evolve(toy_fitness, N, cfg(popsize=1), tmp_path, progress=False)
    with pytest.raises(ValueError, match="tau must be >= 0"):
        evolve(toy_fitness, N, cfg(tau=-1.0), tmp_path, progress=False)
    with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
        evolve(toy_fitness, N, cfg(optimizer="adam"), tmp_path, progress=False)


def test_a_resume_with_other_settings_refuses_and_names_them(tmp_path):
    evolve(toy_fitness, N, cfg(generations=2), tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"popsize: 8 -> 6; sigma0: 0.3 -> 0.2"):
        evolve(toy_fitness, N, cfg(generations=3, popsize=6, sigma0=0.2), tmp_path, progress=False)
    with pytest.raises(ValueError, match="x0_sha256"):  # another start point is another search
        evolve(toy_fitness, N, cfg(generations=3), tmp_path, x0=np.ones(N), progress=False)
    more = evolve(toy_fitness, N, cfg(generations=3), tmp_path, progress=False)
    assert more.generations == 3  # more generations is a resume, not a new search
    # an evolution started before worlds were recorded resumes in the one named; then it is that one's
    assert evolve(toy_fitness, N, cfg(generations=4), tmp_path, progress=False, world="M 1234").generations == 4
    with pytest.raises(ValueError, match="world: 'M 1234' -> 'M 5678'"):  # another M dreams: another search
        evolve(toy_fitness, N, cfg(generations=5), tmp_path, progress=False, world="M 5678")


def test_frame_budget_stops_a_real_frame_counting_search(tmp_path):
    class CountingFitness:
        """Counts 10 'real frames' per candidate and repeat, like RealFitness."""
        frames = 0

        def __call__(self, key, solutions):
            self.frames = 10 * len(solutions) * 2
            return np.asarray(toy_fitness(key, solutions))

    # 8 candidates x 2 repeats x 10 frames = 160 frames a generation: 300 frames allow 2 generations
    result = evolve(CountingFitness(), N, cfg(generations=10, frame_budget=300), tmp_path,
                    progress=False)
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert result.generations == 2 and [r["real_frames"] for r in records] == [160, 160]
    with pytest.raises(ValueError, match="frame budget must be positive"):
        evolve(CountingFitness(), N, cfg(frame_budget=-1), tmp_path / "b", progress=False)


def test_a_search_over_some_parameters_leaves_the_others_at_x0(tmp_path):
    """C on z alone: the weights on h stay exactly where x0 put them, in every vector evolve hands out,
    while the free ones move towards the target."""
    free = free_params(Z, H, "z")
    x0 = np.where(free, 0.0, 0.5)  # fixed entries at a value the target does not have
    seen = []
    result = evolve(lambda k, x: (seen.append(np.asarray(x)), toy_fitness(k, x))[1], N, cfg(generations=20),
                    tmp_path, x0=x0, progress=False, free=free)
    vectors = np.concatenate([np.concatenate(seen), history(tmp_path)["mean"],
                              history(tmp_path)["top"].reshape(-1, N), result.best_params[None]])
    np.testing.assert_array_equal(vectors[:, ~free], 0.5)
    assert np.ptp(vectors[:, free], axis=0).min() > 0  # every free entry was searched
    start = -np.sum((x0 - TARGET) ** 2)
    assert result.best_return > start + 0.5 * np.sum(TARGET[free] ** 2)  # the free part moved to its target
    with pytest.raises(WMError, match="free must mark"):
        evolve(toy_fitness, N, cfg(), tmp_path / "none", progress=False, free=np.zeros(N, bool))


def test_choice_by_reality_resumes_and_redrives_only_what_changed(tmp_path, monkeypatch):
    """`choose_by_reality` writes its table after every candidate; a rerun keeps the rows of the same
    controller on the same V, M and tracks, and drives again what changed or never finished."""
    import wmlib.evaluate
    from wmlib.mdnrnn import load_mdnrnn
    from wmlib.paths import SHIPPED, RunPaths
    from wmlib.pipeline import assemble_agent, choose_by_reality

    stage = RunPaths(tmp_path / "stage")
    assemble_agent(stage.agent_dir, SHIPPED.agent_part("V"), SHIPPED.agent_part("M"))
    m, _ = load_mdnrnn(SHIPPED.agent_part("M"))
    n = n_params(m.z_dim, m.hidden)
    driven: list[float] = []
    crash_at: list[int | None] = [None]

    def fake_evaluate(agent_dir, episodes, seed=0, controller_params=None, **kw):  # a real mean = sum of C
        if len(driven) == crash_at[0]:
            raise KeyboardInterrupt
        driven.append(float(np.sum(controller_params)))
        return {"mean": driven[-1], "std": 0.0, "scores": [driven[-1]] * episodes, "frames": 7 * episodes}

    monkeypatch.setattr(wmlib.evaluate, "evaluate", fake_evaluate)
    a, b = np.zeros(n), np.full(n, 1e-3)
    first = choose_by_reality(stage, [("a", a, 1.0), ("b", b, 2.0)], 3, 100000)
    assert first["chosen"] == "b" and len(driven) == 2 and first["frames"] == 2 * 3 * 7
    assert np.array_equal(np.asarray(to_flat(load_controller(stage.selected)[0])), b.astype(np.float32))
    assert choose_by_reality(stage, [("a", a, 1.0), ("b", b, 2.0)], 3, 100000) == first and len(driven) == 2
    rescored = choose_by_reality(stage, [("a", a, 5.0), ("b", b, 2.0)], 3, 100000)  # the dream's score is no drive
    assert len(driven) == 2 and rescored["candidates"][0]["dream_return"] == 5.0
    c = np.full(n, -1e-3)
    third = choose_by_reality(stage, [("a", a, 1.0), ("b", c, 2.0)], 3, 100000)  # b's parameters changed
    assert driven[2:] == [pytest.approx(-1e-3 * n)] and third["chosen"] == "a"
    choose_by_reality(stage, [("a", a, 1.0)], 3, 100001)  # other tracks: driven again
    assert len(driven) == 4
    # interrupted after the first candidate: the table holds it (frames counted), the choice is not made
    driven[:], crash_at[0] = [], 1
    with pytest.raises(KeyboardInterrupt):
        choose_by_reality(stage, [("a", a, 1.0), ("b", b, 2.0)], 3, 100002)
    partial = json.loads(stage.selection.read_text())
    assert partial["chosen"] is None and [r["name"] for r in partial["candidates"]] == ["a"]
    assert partial["frames"] == 3 * 7
    crash_at[0] = None
    resumed = choose_by_reality(stage, [("a", a, 1.0), ("b", b, 2.0)], 3, 100002)
    assert len(driven) == 2 and resumed["chosen"] == "b" and resumed["frames"] == 2 * 3 * 7


def test_a_screen_drives_every_candidate_on_the_first_tracks_and_chooses_among_the_finalists_on_all(
        tmp_path, monkeypatch):
    """With `screen`, every candidate drives the first SCREEN tracks, the FINALISTS best of them go on to
    the rest (the tracks after the screen, not the same ones again), and the choice is the best mean
    over all tracks; every drive's frames are counted, a rerun drives nothing, and without the screen
    (the screened-out candidates drive on from where they stopped) a candidate it dropped can win: what
    the screen costs."""
    import wmlib.evaluate
    from wmlib.mdnrnn import load_mdnrnn
    from wmlib.paths import SHIPPED, RunPaths
    from wmlib.pipeline import assemble_agent, choose_by_reality

    stage = RunPaths(tmp_path / "stage")
    assemble_agent(stage.agent_dir, SHIPPED.agent_part("V"), SHIPPED.agent_part("M"))
    m, _ = load_mdnrnn(SHIPPED.agent_part("M"))
    n = n_params(m.z_dim, m.hidden)
    # candidate k's score on the track at offset t: the first two tracks, then the rest
    track_scores = {1: (1, 1), 2: (3, 0), 3: (2, 5), 4: (0, 100)}
    driven: list[tuple[int, int, int]] = []

    def fake_evaluate(agent_dir, episodes, seed=0, controller_params=None, **kw):
        k = round(float(np.sum(controller_params)) / (n * 1e-3))
        driven.append((k, seed, episodes))
        scores = [float(track_scores[k][t - 100000 >= 2]) for t in range(seed, seed + episodes)]
        return {"mean": float(np.mean(scores)), "std": 0.0, "scores": scores, "frames": 7 * episodes}

    monkeypatch.setattr(wmlib.evaluate, "evaluate", fake_evaluate)
    candidates = [(f"c{k}", np.full(n, k * 1e-3), 0.0) for k in track_scores]
    chosen = choose_by_reality(stage, candidates, 4, 100000, screen=2, finalists=2)
    assert driven == [(1, 100000, 2), (2, 100000, 2), (3, 100000, 2), (4, 100000, 2), (2, 100002, 2), (3, 100002, 2)]
    rows = {r["name"]: r for r in chosen["candidates"]}
    assert chosen["chosen"] == "c3" and rows["c3"]["real_mean"] == 3.5 and rows["c2"]["real_mean"] == 1.5
    assert rows["c4"]["scores"] == [0.0, 0.0] and rows["c1"]["real_mean"] == 1.0  # screened out on 2 tracks
    assert chosen["frames"] == (4 * 2 + 2 * 2) * 7 and chosen["screen"] == 2
    assert np.allclose(np.asarray(to_flat(load_controller(stage.selected)[0])), 3e-3)
    assert choose_by_reality(stage, candidates, 4, 100000, screen=2, finalists=2) == chosen and len(driven) == 6
    plain = choose_by_reality(stage, candidates, 4, 100000)  # no screen: the screened-out drive on from track 2
    assert driven[6:] == [(1, 100002, 2), (4, 100002, 2)] and plain["chosen"] == "c4" and "screen" not in plain
    assert plain["frames"] == 4 * 4 * 7
    assert choose_by_reality(stage, candidates, 4, 100000, screen=2, finalists=4) == plain  # all would go on


def test_the_summary_finds_the_evolution_that_made_the_final_c_through_a_kept_incumbent(tmp_path, monkeypatch):
    """Round 1 chose evolution seed_1 (dream_choice's layout), round 2 kept it as the incumbent: the
    fidelity that speaks for the final agent is round 1's seed_1, not round 2's evolve/ folder; a choice
    between Ms names the winner's sub-stage."""
    import wmlib.evaluate
    from wmlib.mdnrnn import load_mdnrnn
    from wmlib.paths import SHIPPED, RunPaths
    from wmlib.pipeline import assemble_agent, choose_by_reality, evolution_of_final_c

    def fake_evaluate(agent_dir, episodes, seed=0, controller_params=None, **kw):  # a real mean = sum of C
        mean = float(np.sum(controller_params))
        return {"mean": mean, "std": 0.0, "scores": [mean] * episodes, "frames": 7 * episodes}

    monkeypatch.setattr(wmlib.evaluate, "evaluate", fake_evaluate)
    m, _ = load_mdnrnn(SHIPPED.agent_part("M"))
    n = n_params(m.z_dim, m.hidden)
    run = RunPaths(tmp_path / "run")
    round1, round2 = run.iteration(2), run.iteration(3)
    for stage in (round1, round2):
        assemble_agent(stage.agent_dir, SHIPPED.agent_part("V"), SHIPPED.agent_part("M"))
        (stage.evolve_dir / "seed_0").mkdir(parents=True)
        (stage.evolve_dir / "seed_1").mkdir()
    good, bad = np.full(n, 1e-3), np.zeros(n)
    assert choose_by_reality(round1, [("seed_0", bad, 1.0), ("seed_1", good, 0.5)], 2, 100000)["chosen"] == "seed_1"
    round1.eval.write_text("{}")
    assert evolution_of_final_c(run) == round1.evolve_dir / "seed_1"
    chosen = choose_by_reality(round2, [("seed_0", bad, 9.0), ("seed_1/gen_3", bad, 8.0), ("incumbent", good, 0.0)],
                               2, 100000)["chosen"]
    round2.eval.write_text("{}")
    assert chosen == "incumbent" and evolution_of_final_c(run) == round1.evolve_dir / "seed_1"
    choose_by_reality(round2, [("seed_1/gen_3", -good, 8.0), ("mean", 2 * good, 0.0)], 2, 100000)
    assert evolution_of_final_c(run) == round2.evolve_dir  # select_controller's "mean": the stage's own evolve/
    choose_by_reality(round2, [("seed_1/gen_3", 3 * good, 8.0), ("mean", 2 * good, 0.0)], 2, 100000)
    assert evolution_of_final_c(run) == round2.evolve_dir / "seed_1"  # an earlier search mean of seed_1
    # a choice between Ms (`evolve_and_choose`): each M's own choice in m_K/, the winner named "m_K/..."
    sub = RunPaths(round2.root / "m_1")
    assemble_agent(sub.agent_dir, SHIPPED.agent_part("V"), SHIPPED.agent_part("M"))
    (sub.evolve_dir / "seed_4").mkdir(parents=True)
    choose_by_reality(round2, [("m_0/seed_1", good, 0.0), ("m_1/seed_4/gen_2", 4 * good, 0.0)], 2, 100000)
    assert evolution_of_final_c(run) == sub.evolve_dir / "seed_4"
