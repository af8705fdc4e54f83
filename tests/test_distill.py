"""Knowledge distillation (condcomp.surgery.distill): the loss against a hand computation,
chunked teachers, the shared-weight start, the refusals, and tiny distillation runs (a Switch
teacher into a dense student, a student that is its teacher, resume, two gloo ranks)."""

from __future__ import annotations

import os

import pytest
import torch
from helpers import tiny_model_cfg, tiny_overrides
from ranks import run_ranks

from condcomp.checkpoint import resolve_checkpoint
from condcomp.cli import main
from condcomp.config import DistillConfig, RunConfig, load_config
from condcomp.data import ByteTokenizer
from condcomp.distributed.context import SINGLE
from condcomp.errors import CondcompError, ConfigError
from condcomp.model import TransformerLM
from condcomp.runs import load_run, read_metrics, save_config
from condcomp.surgery.distill import (
    Distiller,
    check_teacher,
    copy_shared_weights,
    teacher_source,
)
from condcomp.train import Trainer, train

SWITCH_FFN = dict(kind="moe", layers="odd", options={"num_experts": 4, "top_k": 1})


def quiet(_message: str) -> None:
    pass


def sets(corpus, tmp, name: str, steps: int = 2) -> list[str]:
    """A tiny run without dropout, so that a student in training mode computes what the same
    model computes in eval mode."""
    return [*tiny_overrides(corpus, tmp, name, steps=steps), "model.dropout=0.0"]


def train_rows(run_dir) -> list[dict]:
    return [row for row in read_metrics(run_dir) if row["kind"] == "train"]


def losses(run_dir) -> list[tuple[float, float, float]]:
    return [(row["train_loss"], row["distill_ce"], row["distill_kl"]) for row in train_rows(run_dir)]


@pytest.fixture(scope="module")
def teachers(corpus, tmp_path_factory):
    """A Switch teacher (MoE on the odd layer) and a dense one, two steps each."""
    tmp = tmp_path_factory.mktemp("teachers")
    train(load_config("dense_tiny", sets(corpus, tmp, "switch") + [
        "model.ffn.kind='moe'", "model.ffn.layers='odd'", "model.ffn.num_experts=4"]), log=quiet)
    train(load_config("dense_tiny", sets(corpus, tmp, "dense")), log=quiet)
    return {"switch": tmp / "switch", "dense": tmp / "dense"}


# ----------------------------------------------------------------------------- the loss


def test_loss_is_alpha_ce_plus_t_squared_kl():
    # Wide initial weights: distributions far from uniform and from each other.
    teacher = TransformerLM(tiny_model_cfg(ffn=SWITCH_FFN, init_std=0.3))
    student = TransformerLM(tiny_model_cfg(init_std=0.3))
    tokens_BT = torch.randint(0, 97, (3, 16))
    targets_BT = torch.randint(0, 97, (3, 16))
    targets_BT[0, :5] = -100  # ignored by the CE, and by the KL
    alpha, T = 0.3, 2.5
    distiller = Distiller(teacher, DistillConfig(teacher="t", alpha=alpha, temperature=T))
    out = student(tokens_BT, targets_BT)
    got = distiller.loss(tokens_BT, targets_BT, out.logits, out.loss)

    with torch.no_grad():
        p_teacher = torch.softmax(teacher.eval()(tokens_BT).logits.double() / T, dim=-1)
    p_student = torch.softmax(out.logits.detach().double() / T, dim=-1)
    kl_BT = (p_teacher * (p_teacher.log() - p_student.log())).sum(-1)
    kept_BT = targets_BT != -100
    kl = kl_BT[kept_BT].mean()
    logp_BTV = torch.log_softmax(out.logits.detach().double(), dim=-1)
    ce = -logp_BTV.gather(-1, targets_BT.clamp(min=0)[..., None])[..., 0][kept_BT].mean()
    assert got.kl.item() == pytest.approx(kl.item(), rel=1e-5)
    assert got.ce.item() == pytest.approx(ce.item(), rel=1e-5)
    assert got.objective.item() == pytest.approx(
        alpha * ce.item() + (1 - alpha) * T * T * kl.item(), rel=1e-5)
    assert kl.item() > 0.1  # different models: the check above is not 0 == 0


# Teachers of every seam's families, and a dense teacher of a sparse student.
PAIRS = {
    "switch teacher": (dict(ffn=SWITCH_FFN), {}),
    "mod teacher": (dict(wrapper=dict(kind="mod", layers="odd", options={"capacity": 0.5})), {}),
    "altup teacher": (dict(residual=dict(kind="altup", options={"k": 2})), {}),
    "mot teacher": (dict(ffn=dict(kind="mot", layers="odd",
                                  options={"num_experts": 4, "group_size": 2})), {}),
    "switch student": ({}, dict(ffn=SWITCH_FFN)),
}


@pytest.mark.parametrize("pair", PAIRS)
def test_chunked_kl_equals_plain_autograd_over_the_whole_micro_batch(pair):
    teacher_seams, student_seams = PAIRS[pair]
    teacher = TransformerLM(tiny_model_cfg(**teacher_seams))
    student = TransformerLM(tiny_model_cfg(**student_seams))
    tokens_BT = torch.randint(0, 97, (6, 16))
    targets_BT = torch.randint(0, 97, (6, 16))
    targets_BT[3, 4:] = -100
    results = []
    # Chunks of whole MoT groups (2 sequences); 4 leaves a last chunk of 2.
    for chunk in ["reference", *((0, 2, 4) if pair == "mot teacher" else (0, 1, 4))]:
        options = DistillConfig(teacher="t", temperature=2.0,
                                teacher_chunk=0 if chunk == "reference" else chunk)
        distiller = Distiller(teacher, options)
        logits_BTV = student(tokens_BT).logits.detach().requires_grad_()
        kl = (distiller.kl_reference if chunk == "reference" else distiller.kl)(
            tokens_BT, targets_BT, logits_BTV)
        (3.0 * kl).backward()
        results.append((kl.detach(), logits_BTV.grad))
    (kl, grad), *chunked = results
    assert torch.isfinite(kl) and kl > 0
    assert (grad[3, 4:] == 0).all() and (grad[3, :4] != 0).any()  # no gradient from ignored
    for chunk_kl, chunk_grad in chunked:
        torch.testing.assert_close(chunk_kl, kl, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(chunk_grad, grad, rtol=1e-5, atol=1e-9)


def test_chunks_that_split_a_mot_teachers_groups_are_refused(tmp_path):
    teacher_cfg = RunConfig(model=tiny_model_cfg(**PAIRS["mot teacher"][0]))
    teacher_cfg.train.seq_len = 32
    save_config(teacher_cfg, tmp_path)
    ByteTokenizer().save(tmp_path / "tokenizer")
    student_cfg = load_config("dense_tiny", ["model.vocab_size=97", "train.seq_len=32",
                                             f"distill.teacher='{tmp_path}'"])
    student_cfg.distill.teacher_chunk = 4
    check_teacher(student_cfg, ByteTokenizer())
    student_cfg.distill.teacher_chunk = 3
    with pytest.raises(ConfigError, match="teacher_chunk = 3 splits the teacher's groups of "
                                          "model.ffn.group_size = 2"):
        check_teacher(student_cfg, ByteTokenizer())


def test_shared_start_copies_a_switch_teachers_non_expert_weights():
    teacher = TransformerLM(tiny_model_cfg(ffn=SWITCH_FFN))
    student = TransformerLM(tiny_model_cfg())
    shared = copy_shared_weights(teacher, student)
    teacher_state, student_state = teacher.state_dict(), student.state_dict()
    expert_layer = "layers.1.block.ffn."
    non_expert = [name for name in student_state if not name.startswith(expert_layer)
                  and name != "lm_head.weight"]  # tied to tok_emb.weight
    assert sorted(shared.copied) == sorted(non_expert)
    for name in non_expert:
        assert torch.equal(student_state[name], teacher_state[name]), name
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert sorted(shared.left) == [f"{expert_layer}{w} (not in the teacher)"
                                   for w in ("w1", "w2", "w3")]
    assert {name.removeprefix(expert_layer) for name in shared.unused} == {
        "router.weight", "experts.w1", "experts.w2", "experts.w3", "selection_bias"}


# ----------------------------------------------------------------------------- runs


def test_distilling_a_switch_teacher_into_a_dense_student(teachers, corpus, tmp_path):
    cfg = load_config("dense_tiny", sets(corpus, tmp_path, "student") + [
        f"distill.teacher='{teachers['switch']}'", "distill.init_from_teacher='shared'",
        "distill.temperature=2.0", "distill.teacher_chunk=3"])
    lines: list[str] = []
    cfg.run_dir.mkdir(parents=True)  # train() makes it, with the lock this test needs not
    trainer = Trainer(cfg, cfg.run_dir, SINGLE, lines.append)
    trainer.run(False, ())
    rows = train_rows(cfg.run_dir)
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        assert all(torch.isfinite(torch.tensor(row[key]))
                   for key in ("train_loss", "distill_ce", "distill_kl"))
        assert row["distill_kl"] > 0
        assert row["train_loss"] == pytest.approx(
            0.75 * row["distill_ce"] + 0.25 * 4.0 * row["distill_kl"], rel=1e-5)
    assert [row["kind"] for row in read_metrics(cfg.run_dir)][-1] == "eval"
    assert any("tensor(s) copied from the teacher: tok_emb.weight" in line for line in lines)
    assert any("of the teacher not used: " in line and "experts.w1" in line for line in lines)
    # The teacher is frozen, in no optimizer and in no checkpoint.
    teacher = trainer.distiller.teacher
    saved = load_run(teachers["switch"]).model.state_dict()
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert not any(p.requires_grad for p in teacher.parameters())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized.isdisjoint(id(p) for p in teacher.parameters())
    student = load_run(cfg.run_dir).model
    assert set(student.state_dict()) == set(TransformerLM(cfg.model).state_dict())


def test_a_student_that_is_its_teacher_has_zero_kl_and_resumes_exactly(teachers, corpus,
                                                                       tmp_path):
    teacher = teachers["dense"]
    same = [f"distill.teacher='{teacher}'", f"train.init_from='{teacher}'"]
    train(load_config("dense_tiny", sets(corpus, tmp_path, "straight") + same), log=quiet)
    first = train_rows(tmp_path / "straight")[0]
    assert first["distill_kl"] == pytest.approx(0.0, abs=1e-6)
    assert first["distill_ce"] > 1.0
    # One step, then --resume for the second: the losses of the straight run, bit for bit.
    train(load_config("dense_tiny", sets(corpus, tmp_path, "split", steps=1) + same),
          log=quiet)
    assert main(["distill", "--teacher", str(teacher), "--config", "dense_tiny", "--resume",
                 *(arg for item in sets(corpus, tmp_path, "split") for arg in ("--set", item))]
                ) == 0
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")


def _distill_rank(rank: int, world: int, sets_: list[str]) -> str:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        train(load_config("dense_tiny", sets_), log=quiet)
        return ""
    except CondcompError as exc:
        return str(exc)


def test_two_ranks_distil_what_one_process_distils(teachers, corpus, tmp_path):
    """Each rank holds the whole teacher; with two micro-batches per step, each rank's is one
    of the single process's."""
    def run_sets(name: str) -> list[str]:
        return sets(corpus, tmp_path, name) + [
            f"distill.teacher='{teachers['switch']}'", "train.grad_accum=2",
            "dist.data_parallel='fsdp'"]

    train(load_config("dense_tiny", run_sets("single")), log=quiet)
    assert run_ranks(_distill_rank, 2, run_sets("ranks")) == ["", ""]
    for got, want in zip(train_rows(tmp_path / "ranks"), train_rows(tmp_path / "single"),
                         strict=True):
        for key in ("train_loss", "distill_ce", "distill_kl"):
            assert got[key] == pytest.approx(want[key], rel=2e-5, abs=1e-7), key


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("extra,message", [
    (["model.vocab_size=300"], "has a vocabulary of 257 tokens (byte tokenizer) and the student "
                               "one of 300"),
    (["model.max_seq_len=128", "train.seq_len=96"],
     "train.seq_len = 96 exceeds the teacher's model.max_seq_len = 64"),
])
def test_a_teacher_the_student_cannot_learn_from_is_one_line(teachers, corpus, tmp_path, capsys,
                                                             extra, message):
    args = [item for entry in sets(corpus, tmp_path, "student") + extra
            for item in ("--set", entry)]
    assert main(["distill", "--teacher", str(teachers["switch"]), "--config", "dense_tiny",
                 *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "student" / "config.json").exists()  # refused before it is written


def test_a_teacher_of_another_tokenizer_of_the_same_size_is_refused(teachers, corpus, tmp_path):
    class OtherBytes(ByteTokenizer):
        def fingerprint(self) -> str:
            return "another tokenizer"

    cfg = load_config("dense_tiny", sets(corpus, tmp_path, "student") + [
        f"distill.teacher='{teachers['dense']}'", "model.vocab_size=257"])
    check_teacher(cfg, ByteTokenizer())
    with pytest.raises(ConfigError, match="has a vocabulary of 257 tokens as the student, but "
                                          "another tokenizer"):
        check_teacher(cfg, OtherBytes())


def test_a_missing_teacher_is_one_line(corpus, tmp_path, capsys):
    args = [item for entry in sets(corpus, tmp_path, "student") for item in ("--set", entry)]
    assert main(["distill", "--teacher", str(tmp_path / "nowhere"), "--config", "dense_tiny",
                 *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"condcomp: error: distill.teacher = '{tmp_path / 'nowhere'}': ")
    assert "not a run directory" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("override,message", [
    ("distill.alpha=1.5", "distill.alpha = 1.5 must be in [0, 1]"),
    ("distill.alpha=-0.1", "distill.alpha = -0.1 must be in [0, 1]"),
    ("distill.temperature=0", "distill.temperature = 0"),
    ("distill.teacher_chunk=-1", "distill.teacher_chunk = -1"),
    ("distill.init_from_teacher='experts'", "distill.init_from_teacher = 'experts' is unknown"),
    ("distill.init_from_teacher='shared'", "distill.teacher is not set"),
])
def test_distill_keys_are_checked(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("dense_tiny", [override])
    assert message in str(err.value) and "\n" not in str(err.value)


def test_init_from_and_init_from_teacher_exclude_each_other():
    with pytest.raises(ConfigError, match="keep one of them"):
        load_config("dense_tiny", ["distill.teacher='runs/t'", "train.init_from='runs/t'",
                                   "distill.init_from_teacher='shared'"])


def test_the_teacher_checkpoint_may_be_named(teachers):
    ckpt = resolve_checkpoint(teachers["dense"]).path
    assert teacher_source(str(ckpt)) == (teachers["dense"], ckpt)
    assert teacher_source(str(teachers["dense"])) == (teachers["dense"], None)
