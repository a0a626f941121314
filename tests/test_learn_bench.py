"""The teacher side of ``make learn-bench`` (tests/learn_bench): family teachers, scoring, caches.

The calibrated teachers come from the shared cache (built on first use: 1-2 minutes on 2 cores);
the scored samples go to a temp dir: 2 of each split and variant, so families 0 and 1 (samples take
the families in turn) and two teacher processes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hyperdistill.common.codec import TopK
from hyperdistill.trainer.data.sampler import collate
from tests.learn_bench import scored as scored_module
from tests.learn_bench import task, teachers
from tests.learn_bench.scored import load_scored

N = 2
"""Samples per split and variant."""
ATOL = 1e-4
CLEAR_GAP = 1e-3
"""Top-K ids must match exactly where neighbouring log-probs differ by more than this."""


@pytest.fixture(scope="module")
def family_teachers():
    return teachers.ensure_teachers()


@pytest.fixture(scope="module")
def scored_dir(tmp_path_factory, family_teachers):
    out = tmp_path_factory.mktemp("scored")
    load_scored(n_train=N, n_eval=N, out=out)
    return out


def test_calibrated_kl_per_family(family_teachers):
    assert len(family_teachers.kl) == teachers.FAMILIES
    assert all(0.35 <= kl <= 0.65 for kl in family_teachers.kl), family_teachers.kl


def test_service_topk_equals_student_plus_family_lora(tiny_models, family_teachers, scored_dir):
    """Through the service (hf engine, padded batches) = the student with LoRA_c through `hyper_lora`."""
    student = teachers.load_student(tiny_models.student)
    lm_head = student.get_output_embeddings()
    for sets in load_scored(n_train=N, n_eval=N, out=scored_dir).values():
        assert [e["family"] for e in sets.train + sets.eval] == [0, 1, 0, 1]
        for e in sets.train + sets.eval:
            lora = family_teachers.loras[e["family"]]
            hidden = teachers.hidden_states(student, collate([e], 0), lora)[0, :-1]
            with torch.inference_mode():
                _assert_topk_matches(e["teacher_ids"], e["teacher_logprobs"], torch.log_softmax(lm_head(hidden), -1))


def _assert_topk_matches(ids: np.ndarray, logprobs: np.ndarray, ref: torch.Tensor) -> None:
    """ids int32 [T-1, K] and logprobs float32 [T-1, K] from the service; ref float32 [T-1, V] in-process."""
    k = ids.shape[1]
    assert ids.dtype == np.int32 and logprobs.dtype == np.float32 and ids.shape == (len(ref), k)
    expected, expected_ids = (t.numpy() for t in ref.topk(k + 1, dim=1))
    np.testing.assert_allclose(logprobs, expected[:, :k], rtol=0, atol=ATOL)
    # Each id carries its own log-prob, and ids match exactly where no neighbour is within CLEAR_GAP.
    np.testing.assert_allclose(ref.gather(1, torch.from_numpy(ids).long()).numpy(), logprobs, rtol=0, atol=ATOL)
    gaps = -np.diff(expected, axis=1)  # [T-1, K]: gap of each rank to the next
    clear = (gaps > CLEAR_GAP) & np.concatenate([np.ones((len(ref), 1), bool), gaps[:, :-1] > CLEAR_GAP], 1)
    assert clear.mean() > 0.5
    np.testing.assert_array_equal(ids[clear], expected_ids[:, :k][clear])


def test_held_out_samples_use_only_held_out_paraphrases(scored_dir):
    scored = load_scored(n_train=N, n_eval=N, out=scored_dir)
    for variant in task.VARIANTS:
        paraphrases = list(task.family_paraphrases(variant).values())
        for held_out in (False, True):
            for sample in task.make_samples(variant, 64, held_out=held_out, seed=3):
                first_held_out = len(paraphrases[sample.family]) - task.HELD_OUT
                assert (sample.paraphrase >= first_held_out) == held_out
                assert sample.messages[0]["content"].startswith(paraphrases[sample.family][sample.paraphrase])
        for held_out, examples in ((False, scored[variant].train), (True, scored[variant].eval)):
            for e in examples:
                assert (e["paraphrase"] >= len(paraphrases[e["family"]]) - task.HELD_OUT) == held_out


def test_scored_cache_is_reused_and_rescored_when_a_parameter_changes(scored_dir, monkeypatch):
    before = load_scored(n_train=N, n_eval=N, out=scored_dir)
    scored_calls = []

    def fake_score(teacher_dirs, examples, log_dir):
        scored_calls.append([e["trajectory_id"] for e in examples])
        return [
            TopK(
                np.zeros((len(e["input_ids"]) - 1, teachers.TOP_K), np.int32),
                np.zeros((len(e["input_ids"]) - 1, teachers.TOP_K), np.float32),
                np.zeros(len(e["input_ids"]) - 1, np.float32),
            )
            for e in examples
        ]

    monkeypatch.setattr(scored_module, "score", fake_score)
    again = load_scored(n_train=N, n_eval=N, out=scored_dir)
    assert scored_calls == []  # no teacher started
    for variant in task.VARIANTS:
        for a, b in zip(
            before[variant].train + before[variant].eval, again[variant].train + again[variant].eval, strict=True
        ):
            np.testing.assert_array_equal(a["teacher_logprobs"], b["teacher_logprobs"])
    changed = load_scored(n_train=N, n_eval=N + 1, out=scored_dir)
    assert scored_calls == [[f"{v}/eval/{i}" for v in task.VARIANTS for i in range(N + 1)]]
    assert all(not e["teacher_logprobs"].any() for sets in changed.values() for e in sets.eval)
    assert all(e["teacher_logprobs"].any() for sets in changed.values() for e in sets.train)


def test_teachers_are_rebuilt_when_the_student_changes(tmp_path, monkeypatch):
    calls = []

    def fake_calibrate(student, batch, student_dir, out, family):
        calls.append(family)
        out.mkdir()
        teachers.save_factors({"layer": (torch.zeros(1, 2), torch.zeros(3, 1))}, out / "lora.safetensors")
        return 1.0, 0.5

    monkeypatch.setattr(teachers, "_calibrate", fake_calibrate)
    monkeypatch.setattr(teachers, "calibration_batches", lambda tokenizer: [None] * teachers.FAMILIES)
    first = teachers.ensure_teachers(tmp_path)
    assert calls == list(range(teachers.FAMILIES)) and first.kl == [0.5] * teachers.FAMILIES
    assert teachers.ensure_teachers(tmp_path).key == first.key and len(calls) == teachers.FAMILIES
    monkeypatch.setattr(teachers, "student_fingerprint", lambda student_dir: "another student")
    assert teachers.ensure_teachers(tmp_path).key != first.key
    assert len(calls) == 2 * teachers.FAMILIES


def test_runner_trains_both_arms_and_the_oracle_closes_the_gap(scored_dir, tmp_path):
    """The bench's own pieces on the scored samples: two steps of each arm, then every arm; the
    oracle (the true LoRA_c) reproduces the service's teacher, so it closes the whole gap."""
    from hyperdistill.common.config import load_config
    from hyperdistill.trainer.config import TrainerConfig
    from tests.learn_bench import run

    data = load_scored(["instructions"], n_train=N, n_eval=N, out=scored_dir)["instructions"]
    adapters = {}
    for kind, arm in (("hyper", "generated"), ("static", "static")):
        cfg = load_config(TrainerConfig, run.CONFIG, overrides=[f"hypernetwork.kind={kind}"])
        student = run.load_student_for(cfg)
        adapters[arm], losses = run.train_arm(cfg, student, data, steps=2, batch_size=2, seed=0, run_dir=tmp_path)
        assert len(losses) == 2 and all(np.isfinite(losses))
    arms = run.evaluate(cfg, student, data, adapters)
    assert list(arms) == ["none", "generated", "prompt_swap", "static", "oracle"]
    assert arms["none"]["kl"] > 0.2 and arms["none"]["gap_closed"] == 0.0
    assert arms["oracle"]["kl"] < 1e-3 * arms["none"]["kl"] and arms["oracle"]["top1_agreement"] > 0.99
    assert set(run.diagnose(adapters["generated"], data)) == {"context_family_share", "delta_alignment"}
    # The routed arm's whole schedule (the Trainer's `RoutingSchedule`), shrunk: 2 bootstrap steps of
    # 4 samples, clustering into the 4 experts, router pre-training, the switch, a routed step, the
    # first re-routing window (steps 3-4: every sample scored under every expert), its re-routing.
    routed_overrides = [
        "hypernetwork.kind=routed",
        "hypernetwork.route_after_steps=2",
        "hypernetwork.route_relabel_after=1",
        "hypernetwork.route_relabel_steps=2",
        "hypernetwork.router_pretrain_steps=2",
    ]
    cfg = load_config(TrainerConfig, run.CONFIG, overrides=routed_overrides)
    routed, losses = run.train_arm(
        cfg, run.load_student_for(cfg), data, steps=6, batch_size=4, seed=0, run_dir=tmp_path
    )
    assert len(losses) == 6 and all(np.isfinite(losses)) and bool(routed.routing_set)
    assert not any(p.requires_grad for p in routed.router.parameters())
    assert set(routed.schedule.events) == {"routing", "relabel"} and routed.schedule.relabels == 1
    assert len(routed.schedule.events["relabel"].labels) == 2 * 4
    assert (tmp_path / "routing_rank0.json").exists() and (tmp_path / "relabel_rank0.json").exists()
    found = run.diagnose(routed, data)
    assert 0.25 <= found["bootstrap_cluster_purity"] <= 1 and 0.25 <= found["relabel_purity"] <= 1
