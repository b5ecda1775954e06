"""The speed paths compute what the plain paths compute (numerics kept, issue 5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from training.batching import token_budget_batches


class _TiedHead(torch.nn.Module):
    def __init__(self, hidden: int, vocab: int):
        super().__init__()
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=False)

    def get_base_model(self):
        return self


def test_chunked_answer_loss_matches_one_chunk():
    from training.joint import answer_token_loss

    torch.manual_seed(0)
    model = _TiedHead(16, 500)
    hidden = torch.randn(3, 300, 16, requires_grad=True)
    labels = torch.randint(0, 500, (3, 300))
    labels[:, :50] = -100
    chunked, n = answer_token_loss(model, hidden, labels, chunk=64)
    chunked.backward()
    grads = hidden.grad.clone(), model.lm_head.weight.grad.clone()
    hidden.grad = None
    model.lm_head.weight.grad = None
    whole, _ = answer_token_loss(model, hidden, labels, chunk=10**9)
    whole.backward()
    assert n == 3 * 250  # next-token targets: positions 50..299 of each row
    assert torch.allclose(chunked, whole, atol=1e-6)
    assert torch.allclose(grads[0], hidden.grad, atol=1e-6)
    assert torch.allclose(grads[1], model.lm_head.weight.grad, atol=1e-6)


def padding_fraction(lengths, batches):
    """Share of the padded [rows x width] blocks that is padding."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1.0 - real / padded


def test_token_budget_batches_respect_budget_and_cover_every_row():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(300, 1400) for _ in range(200)]
    batches = token_budget_batches(lengths, 8192, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert all(len(b) * max(lengths[i] for i in b) <= 8192 for b in batches)
    fixed = [list(range(i, i + 4)) for i in range(0, 200, 4)]
    assert padding_fraction(lengths, batches) < 0.1 < padding_fraction(lengths, fixed)
    assert token_budget_batches(lengths, 8192, seed=3) == batches  # a pure function of the seed
    assert token_budget_batches([5000, 10], 1024, shuffle=False) == [[0], [1]]  # oversize row alone


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory):
    from model.backbone import load_backbone

    torch.manual_seed(0)
    model = load_backbone("tiny", load_in_4bit=True, device="cpu")
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a trained-looking adapter: B != 0 so the merge matters
            param.data.normal_(0, 0.05)
    out = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(out)
    return out


def test_merged_nf4_model_matches_nf4_plus_lora(tiny_adapter):
    from model.backbone import load_backbone, load_merged

    ids = torch.randint(0, 2000, (2, 24))
    plain = load_backbone("tiny", load_in_4bit=True, device="cpu", adapter_dir=tiny_adapter, trainable=False)
    merged = load_merged("tiny", tiny_adapter, load_in_4bit=True, device="cpu")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = plain(input_ids=ids).logits.float()
        b = merged(input_ids=ids).logits.float()
    # bf16 rounding only: a merge into the wrong base (e.g. unquantised weights) is off by far more
    assert (a - b).abs().max() < 0.05 * a.abs().max()


def test_batched_alignment_scores_equal_one_case_at_a_time(tiny_adapter, shared_fixtures):
    from data import load_cases
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig
    from model.backbone import load_backbone, load_tokenizer
    from model.loaded_export import LoadedExport

    cases = load_cases(shared_fixtures / "setA" / "archehr-qa.xml", shared_fixtures / "setA" / "archehr-qa_key.json")[
        :5
    ]
    torch.manual_seed(0)
    model = load_backbone("tiny", load_in_4bit=False, device="cpu", adapter_dir=tiny_adapter, trainable=False)
    head = NotePairHead(HeadConfig(hidden_size=model.get_base_model().config.hidden_size)).eval()
    ckpt = LoadedExport(manifest={}, threshold=0.5, tokenizer=load_tokenizer("tiny"), model=model, head=head)
    one = [ckpt.score_pairs(c) for c in cases]
    batched = ckpt.score_all(cases, batch_size=4)
    for a, b, case in zip(one, batched, cases):
        assert a.shape == (len(case.answer_sentences), len(case.note_sentences))
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_training_loop_uses_token_budget_batches(tmp_path):
    from data.emrqa import emrqa_to_prompt_example, load_emrqa
    from model.backbone import load_tokenizer
    from training.config import build_config
    from training.data import encode_items
    from training.run import run_training

    from conftest import EXAMPLES

    data = EXAMPLES / "emrqa_sample.jsonl"
    cfg = build_config(
        dict(
            stage="domain",
            preset="tiny",
            data=str(data),
            out=str(tmp_path / "run"),
            batch_tokens=2048,
            max_length=2048,
            epochs=2,
            log_every=1,
            progress=False,
            gradient_checkpointing=False,
            plot=False,
        )
    )
    tok = load_tokenizer("tiny")
    items, _ = encode_items(tok, [emrqa_to_prompt_example(r) for r in load_emrqa(data)], 2048)
    expected = len(token_budget_batches([len(it) for it in items], 2048))
    assert 1 < expected < len(items)  # several rows per batch, more than one batch
    result = run_training(cfg)
    assert result.steps == 2 * expected
    assert all(row["tokens_per_s"] > 0 for row in result.history)


def test_log_rows_time_each_windows_batch_building(tmp_path, monkeypatch):
    """``collate_s``: the host seconds a logging window spent building its batches, that
    window's alone (a suspect when a stage runs below the GPU's rate: issue 21's task stage)."""
    import time

    from training import loop
    from training.config import build_config
    from training.run import run_training

    from conftest import EXAMPLES

    real = loop.collate

    def slow_collate(items, pad_id):
        time.sleep(0.05)
        return real(items, pad_id)

    monkeypatch.setattr(loop, "collate", slow_collate)
    cfg = dict(stage="domain", preset="tiny", data=str(EXAMPLES / "emrqa_sample.jsonl"), out=str(tmp_path / "run"))
    cfg.update(batch_tokens=2048, max_length=2048, max_steps=4, log_every=2, progress=False, plot=False)
    result = run_training(build_config(dict(cfg, gradient_checkpointing=False)))
    assert [row["step"] for row in result.history] == [2, 4]
    assert all(0.1 <= row["collate_s"] < 0.2 for row in result.history)  # two batches a window, 0.05 s each


# --- fast greedy decoding (issue 12) ------------------------------------------------------


def _generate_reference(model, prompts, max_new, stop_ids, pad_id):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=pad_id,
            eos_token_id=stop_ids,
        )
    rows = []
    for toks in out[:, width:].tolist():
        cut = next((j + 1 for j, t in enumerate(toks) if t in stop_ids), len(toks))
        rows.append(toks[:cut])
    return rows


@pytest.mark.parametrize("graphs", [False, True])
def test_fast_greedy_decode_equals_generate_token_for_token(graphs):
    from model.backbone import build_random_base
    from model.decoding import DecodeStats, greedy_decode

    torch.manual_seed(0)
    model = build_random_base("tiny").eval()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(100, 3000, (n,), generator=gen).tolist() for n in (37, 5, 64, 20, 90)]
    # A stop token that greedy decoding does emit, so early stop and padding after it are exercised.
    reference = _generate_reference(model, prompts, 12, [151645], 151643)
    stop = reference[1][3]
    reference = _generate_reference(model, prompts, 12, [stop], 151643)
    stats = DecodeStats()
    # batch_rows=2: several batches, one of them a single row; graphs=True on CPU runs eagerly
    fast = greedy_decode(
        model,
        prompts,
        max_new_tokens=12,
        stop_ids=[stop],
        pad_id=151643,
        batch_rows=2,
        prefill_tokens=64,
        use_cuda_graph=graphs,
        check_every=3,
        stats=stats,
    )
    assert fast == reference
    assert any(len(r) < 12 for r in fast) and any(len(r) == 12 for r in fast)
    assert stats.new_tokens == sum(len(r) for r in fast)
    assert not stats.cuda_graph  # no CUDA here: the same step, eager


def test_decode_attention_matches_grouped_reference_with_padding_and_unwritten_slots():
    from model.decoding import MATMUL, choose_decode_attention, decode_attention

    gen = torch.Generator().manual_seed(3)
    b, heads, n_kv, slots, d = 3, 8, 2, 11, 16
    q = torch.randn(b, heads, 1, d, generator=gen)
    k = torch.randn(b, n_kv, slots, d, generator=gen)
    v = torch.randn(b, n_kv, slots, d, generator=gen)
    keep = torch.ones(b, 1, 1, slots, dtype=torch.bool)
    keep[0, ..., :4] = False  # left padding of a shorter prompt
    keep[:, ..., 9:] = False  # slots the decode has not written yet
    got = decode_attention(q, k, v, keep, d**-0.5, MATMUL)
    want = torch.empty_like(got)
    for row in range(b):  # query head h reads KV head h // (heads // n_kv), real slots only
        real = keep[row, 0, 0]
        for h in range(heads):
            kv = h // (heads // n_kv)
            weights = torch.softmax(k[row, kv, real] @ q[row, h, 0] * d**-0.5, dim=0)
            want[row, h, 0] = weights @ v[row, kv, real]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert choose_decode_attention(torch.device("cpu"), torch.float32, heads, n_kv, d) == (MATMUL, None)
    # an fp32 model on CUDA keeps the matmul attention, with the reason (no probe needed to know)
    impl, why = choose_decode_attention(torch.device("cuda"), torch.float32, heads, n_kv, d)
    assert impl == MATMUL and "bf16 or fp16" in why


def test_fast_decode_records_its_attention_and_refuses_an_unknown_one():
    from model.backbone import build_random_base
    from model.decoding import DecodeStats, greedy_decode

    model = build_random_base("tiny").eval()
    stats = DecodeStats()
    greedy_decode(model, [[11, 12, 13]], max_new_tokens=2, stop_ids=[], pad_id=0, batch_rows=1, stats=stats)
    assert stats.attention == "matmul" and stats.attention_fallback is None
    with pytest.raises(ValueError, match="attention must be"):
        greedy_decode(model, [[11, 12, 13]], max_new_tokens=2, stop_ids=[], pad_id=0, batch_rows=1, attention="flash")


def test_fast_decode_stops_early_when_every_row_is_done():
    from model.backbone import build_random_base
    from model.decoding import DecodeStats, greedy_decode

    torch.manual_seed(0)
    model = build_random_base("tiny").eval()
    prompts = [[11, 12, 13, 14], [15, 16, 17]]
    first = greedy_decode(model, prompts, max_new_tokens=1, stop_ids=[], pad_id=0, batch_rows=2)
    stats = DecodeStats()
    # every row's first token is a stop token: one check after the first burst ends the batch
    out = greedy_decode(
        model,
        prompts,
        max_new_tokens=50,
        stop_ids=sorted({first[0][0], first[1][0]}),
        pad_id=0,
        batch_rows=2,
        check_every=4,
        stats=stats,
    )
    assert out == first
    assert stats.decode_steps <= 4


def test_fast_checkpoint_equals_loaded_checkpoint(tiny_adapter):
    from bench.synthetic import inference_cases
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig
    from inference.fast import FastEngine
    from model.backbone import load_backbone, load_tokenizer
    from model.loaded_export import LoadedExport

    torch.manual_seed(0)
    model = load_backbone("tiny", load_in_4bit=False, device="cpu", adapter_dir=tiny_adapter, trainable=False)
    head = NotePairHead(HeadConfig(hidden_size=64)).eval()
    plain = LoadedExport(manifest={}, threshold=0.5, tokenizer=load_tokenizer("tiny"), model=model, head=head)
    fast = FastEngine(plain)
    cases = inference_cases(5, seed=3)
    cases[2].answer_sentences.clear()  # a case without answer sentences: an empty score matrix
    assert fast.generate_answers(cases, max_new_tokens=6, batch_size=2) == plain.generate_answers(
        cases, max_new_tokens=6, batch_size=2
    )
    got = fast.score_all(cases, max_tokens=1500)
    want = plain.score_all(cases, batch_size=1)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-4)
    report = fast.report()
    assert report["alignment"]["forwards"] >= 2 and report["decode"]["new_tokens"] > 0
    assert report["plans"][0]["budget_gb"] is None  # CPU: fixed sizes, said so


def test_token_budget_packs_and_memory_plan_arithmetic():
    from inference.memory import dense_weight_bytes, should_merge
    from model.packed import token_budget_packs
    from model.presets import QWEN3_4B_ARCH

    lengths = [900, 120, 1500, 880, 130, 1490, 5000]
    packs = token_budget_packs(lengths, 3000)
    assert sorted(i for g in packs for i in g) == list(range(7))
    assert packs[0] == [6]  # longer than the budget: alone
    assert all(sum(lengths[i] for i in g) <= 3000 for g in packs[1:])  # real tokens, no padding
    assert packs[1:] == [[2, 5], [0, 3, 4, 1]]  # longest first, each pack filled in order
    # Qwen3-4B in bf16: about 8 GB (tied embeddings once)
    assert 7.5e9 < dense_weight_bytes(QWEN3_4B_ARCH) < 8.3e9
    assert should_merge(QWEN3_4B_ARCH, int(14e9))[0] and not should_merge(QWEN3_4B_ARCH, int(9e9))[0]


def test_journey_rate_after_warmup_weighs_windows_by_their_seconds():
    from bench.journey import tokens_per_s_after

    # The task stage's log of the H200 journey of 2026-12-03 23:46 UTC: a window each 5 steps.
    rows = [
        {"step": 5, "tokens": 38033, "tokens_per_s": 3413.7},
        {"step": 10, "tokens": 70230, "tokens_per_s": 12289.5},
        {"step": 15, "tokens": 107791, "tokens_per_s": 14442.3},
        {"step": 18, "tokens": 130043, "tokens_per_s": 10970.5},
    ]
    # 92,010 tokens in 2.620 + 2.601 + 2.028 s; the median of the three windows is 12,289.5
    assert tokens_per_s_after(rows, skip=5) == pytest.approx(12692.8, abs=0.1)
    assert tokens_per_s_after(rows, skip=0) == pytest.approx(130043 / (38033 / 3413.7 + 7.2494), abs=1.0)
    assert tokens_per_s_after(rows, skip=18) is None


@pytest.mark.slow
def test_journey_tiny_runs_every_stage_on_cpu(tmp_path, monkeypatch):
    import json

    from bench import journey

    monkeypatch.setenv("ARCHEHR_CACHE", str(tmp_path / "cache"))
    rc = journey.main(["--preset", "tiny", "--tiny", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")])
    result = json.loads(next((tmp_path / "out").glob("journey-*.json")).read_text())
    assert rc == 0 and result["passed"]
    assert [r["stage"] for r in result["stages"]] == ["domain", "task", "infer"]
    domain, task, infer = result["stages"]
    assert domain["steps"] == 3 and domain["tokens_per_s_steady"] > 0 and "export_s" in domain
    assert domain["tokens_per_s_after_warmup"] > 0
    assert task["wall_s"] > 0 and "export_s" in task
    assert set(task["setup_steps_s"]) == {"tokenizer_s", "data_s", "model_s", "prepare_s"}
    assert infer["new_tokens"] > 0 and "subtask4.zip" in infer["written"] and "run.json" in infer["written"]


@pytest.mark.slow
def test_journey_split_over_two_calls_continues_in_the_same_work_folder(tmp_path, monkeypatch):
    """What two device commands on one warm machine do: domain first, then task and infer."""
    import json

    from bench import journey

    monkeypatch.setenv("ARCHEHR_CACHE", str(tmp_path / "cache"))
    common = ["--preset", "tiny", "--tiny", "--work", str(tmp_path / "work")]
    with pytest.raises(SystemExit):  # nothing to continue yet
        journey.main([*common, "--out", str(tmp_path / "none"), "--stages", "task,infer"])
    assert journey.main([*common, "--out", str(tmp_path / "a"), "--stages", "domain"]) == 0
    assert journey.main([*common, "--out", str(tmp_path / "b"), "--stages", "task,infer"]) == 0
    second = json.loads(next((tmp_path / "b").glob("journey-*.json")).read_text())
    assert [r["stage"] for r in second["stages"]] == ["task", "infer"] and second["passed"]


def test_decode_profile_runs_on_cpu_and_states_the_floor(tmp_path, capsys):
    import json

    from bench import decode_profile
    from inference.memory import dense_weight_bytes
    from model.backbone import build_random_base, decoder, resolve_preset
    from model.decoding import kv_bytes_per_token

    assert (
        decode_profile.main(
            [
                "--preset",
                "tiny",
                "--rows",
                "3",
                "--width",
                "64",
                "--new",
                "4",
                "--bandwidth-tbs",
                "1",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    (path,) = tmp_path.glob("decode-profile-*.json")
    result = json.loads(path.read_text())
    assert result["width"] == 64 and result["cache_slots"] == 64 + 3
    assert result["chosen_attention"] == "matmul" and result["attention_fallback"] is None  # CPU
    assert result["step_ms_graph"] > 0 and result["step_ms_graph_chosen"] > 0
    assert any(op["name"] == "aten::matmul" for op in result["profile"]["aten_ops"])
    arch = resolve_preset("tiny").arch
    cache = kv_bytes_per_token(decoder(build_random_base("tiny")).config) * 3 * 67
    assert result["floor"]["ms_at_bandwidth"] == round(1e3 * (dense_weight_bytes(arch) + cache) / 1e12, 2)
    assert "wrote" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_run_smoke_has_old_and_fast_inference_rows(tmp_path, monkeypatch):
    import json

    from bench import run

    monkeypatch.setenv("ARCHEHR_CACHE", str(tmp_path / "cache"))
    # The fast rows alone first: they must make the bench adapter themselves (they once relied
    # on the old path's row having saved it).
    assert (
        run.main(
            [
                "--smoke",
                "--skip",
                "textbook,ours",
                "--skip-infer",
                "0,1",
                "--fast-caps",
                "0,16",
                "--out",
                str(tmp_path / "fast"),
            ]
        )
        == 0
    )
    assert (
        run.main(
            [
                "--smoke",
                "--skip",
                "textbook,ours",
                "--skip-infer",
                "0",
                "--fast-caps",
                "",
                "--out",
                str(tmp_path / "old"),
            ]
        )
        == 0
    )
    assert len(json.loads(next((tmp_path / "old").glob("smoke-*.json")).read_text())["infer"]) == 1
    result = json.loads(next((tmp_path / "fast").glob("smoke-*.json")).read_text())
    assert [r["cap_gb"] for r in result["infer_fast"]] == [None, 16.0]
    for row in result["infer_fast"]:
        # infer.py's own load: the standalone one for the bench's NF4 random base
        assert row["loader"] == "standalone"
        assert row["new_tokens"] > 0 and set(row["load_steps_s"]) == {
            "tokenizer_s",
            "bitsandbytes_import_s",
            "base_s",
            "adapter_merge_s",
            "kernels_s",
        }
        assert row["alignment"]["tokens"] == row["alignment"]["padded_tokens"]  # packed, no padding
        # Subtask 2 packed on its own, near the per-case path; Subtasks 2-4 of the generated
        # cases in one pass, their head outputs read off the prefill
        assert row["relevance_max_abs_diff"] < 1e-2
        assert row["one_pass_head_cases"] == {"prefill_shared": 3, "own_forwards": 0}
        assert row["separate_passes_head_cases"] == {"prefill_shared": 0, "own_forwards": 3}


@pytest.mark.parametrize("value", ["0", "-3", "lots", "inf", "nan"])
def test_infer_max_memory_gb_must_be_a_positive_number(value, capsys):
    import infer

    with pytest.raises(SystemExit) as exc:
        infer.build_parser().parse_args(["x.xml", "--out", "o", "--max-memory-gb", value])
    assert exc.value.code == 2
    assert infer.build_parser().parse_args(["x.xml", "--out", "o", "--max-memory-gb", "15.5"]).max_memory_gb == 15.5


def test_memory_plan_for_16gb_and_80gb_cards(monkeypatch):
    """Qwen3-4B shape: the KV cache of the planned rows and a prefill's activations fit what is
    left after the 8 GB of dense weights (alignment forwards run with no cache held, so their
    activations alone must fit); the whole 47-prompt batch fits an 80 GB card."""
    from types import SimpleNamespace

    from transformers import Qwen3Config

    import inference.memory as memory
    from model.presets import QWEN3_4B_ARCH

    config = Qwen3Config(**QWEN3_4B_ARCH)
    fake = SimpleNamespace(model=SimpleNamespace(config=config, embed_tokens=SimpleNamespace(weight=torch.empty(0))))
    rows = {}
    for card, budget in (("16", 6.1e9), ("80", 66e9)):
        monkeypatch.setattr(memory, "available_bytes", lambda *a, b=budget, **k: int(b))
        plan = memory.plan_batches(fake, prompt_tokens=1500, max_new_tokens=100)
        assert plan.kv_bytes_per_token == 147456  # 36 layers x 2 x 8 heads x 128 x 2 bytes
        kv = plan.gen_rows * plan.kv_bytes_per_token * (1536 + 100)
        per_token = memory.activation_bytes_per_token(config)
        assert kv + plan.prefill_tokens * per_token <= budget and plan.align_tokens * per_token <= budget
        assert plan.decode_budget_bytes <= budget - plan.prefill_tokens * per_token
        # the planned rows at the longest prompt fit the decode budget with their logits and activations
        row = plan.kv_bytes_per_token * (1536 + 100) + plan.row_overhead_bytes
        assert plan.gen_rows * row <= plan.decode_budget_bytes < (plan.gen_rows + 1) * row
        assert plan.row_overhead_bytes == config.vocab_size * 4 + 2 * per_token
        assert plan.prefill_tokens <= memory.PREFILL_MAX_TOKENS
        rows[card] = plan.gen_rows
    assert 18 <= rows["16"] < 47 <= rows["80"]  # 16 before the prefill was chunked apart
    assert memory.plan_batches(fake, prompt_tokens=1500, max_new_tokens=100, max_rows=5).gen_rows == 5


def _tiny_random_export():
    """A LoadedExport of the tiny preset with random weights and head (seed 0), on CPU."""
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig
    from model.backbone import build_random_base, load_tokenizer
    from model.loaded_export import LoadedExport

    torch.manual_seed(0)
    return LoadedExport(
        manifest={},
        threshold=0.5,
        tokenizer=load_tokenizer("tiny"),
        model=build_random_base("tiny").eval(),
        head=NotePairHead(HeadConfig(hidden_size=64)).eval(),
    )


def test_shorter_decode_batches_take_more_rows_within_the_budget():
    """Longest prompts first; each batch's rows x (KV at its width + overhead) stays within the
    budget, so batches of shorter prompts hold more rows; the user's row cap still applies."""
    from model.decoding import _decode_batches, bucket_width

    lengths = [1400 - 7 * i for i in range(150)]
    prompts = [[1] * n for n in lengths]
    kv, new, overhead = 1000, 100, 5000
    budget = 30 * (kv * (bucket_width(1400) + new) + overhead)
    batches = list(_decode_batches(prompts, 10**6, True, budget, (kv, new, overhead)))
    assert sorted(i for idx, _, _ in batches for i in idx) == list(range(150))
    for idx, rows, width in batches:
        assert width == bucket_width(max(lengths[i] for i in idx)) and rows >= len(idx)
        assert rows * (kv * (width + new) + overhead) <= budget
    sizes = [len(idx) for idx, _, _ in batches]
    assert sizes[0] == 30 and max(sizes) > 30 and len(batches) < 5
    capped = list(_decode_batches(prompts, 16, True, budget, (kv, new, overhead)))
    assert max(len(idx) for idx, _, _ in capped) == 16
    # without graphs the rows are exact; without a budget only the cap decides
    assert [r for _, r, _ in _decode_batches(prompts[:5], 4, False, None, (kv, new, 0))] == [4, 1]


@pytest.mark.parametrize("n,rows", [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (17, 24), (147, 152)])
def test_decode_rows_bucket_wastes_few_rows(n, rows):
    from model.decoding import bucket_batch

    assert bucket_batch(n) == rows


def test_fast_engine_lets_memory_size_the_later_batches(monkeypatch):
    """With a memory plan and no --batch-size, the plan's rows at the longest prompt do not cap
    the later batches (the decode budget does); a --batch-size does cap them."""
    from bench.synthetic import inference_cases
    from inference import fast as fast_module
    from inference.memory import BatchPlan

    plain = _tiny_random_export()
    plan = BatchPlan(1.0, 2, 4096, 4096, 512, decode_budget_bytes=10**9, row_overhead_bytes=7)
    monkeypatch.setattr(fast_module, "plan_batches", lambda *a, **k: plan)
    seen = []
    real = fast_module.greedy_decode

    def spy(*args, **kwargs):
        seen.append((kwargs["batch_rows"], kwargs["decode_budget_bytes"], kwargs["row_overhead_bytes"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(fast_module, "greedy_decode", spy)
    cases = inference_cases(5, seed=8)
    fast_module.FastEngine(plain).generate_answers(cases, max_new_tokens=3)
    fast_module.FastEngine(plain).generate_answers(cases, max_new_tokens=3, batch_size=3)
    assert seen == [(5, 10**9, 7), (2, 10**9, 7)]


def test_fast_checkpoint_retries_smaller_after_out_of_memory(monkeypatch):
    """A plan that does not fit after all: halved, said, recorded; the answers still come."""
    from bench.synthetic import inference_cases
    from inference import fast as fast_module

    plain = _tiny_random_export()
    real = fast_module.greedy_decode
    seen = []

    def flaky(*args, batch_rows, **kwargs):
        seen.append(batch_rows)
        if batch_rows > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(*args, batch_rows=batch_rows, **kwargs)

    monkeypatch.setattr(fast_module, "greedy_decode", flaky)
    said = []
    fast = fast_module.FastEngine(plain, log=said.append)
    cases = inference_cases(3, seed=8)
    assert fast.generate_answers(cases, max_new_tokens=4, batch_size=8) == plain.generate_answers(
        cases, max_new_tokens=4, batch_size=3
    )
    assert seen == [8, 4, 2]
    assert len(fast.report()["fallbacks"]) == 2 and all("out of memory" in m for m in said)


# --- Subtask 2 relevance in token-budget groups (issue 12) ---------------------------------


def _tiny_checkpoint(adapter_dir, relevance: bool = True):
    from heads.alignment import NotePairHead
    from heads.config import HeadConfig
    from model.backbone import load_backbone, load_tokenizer
    from model.loaded_export import LoadedExport

    torch.manual_seed(0)
    model = load_backbone("tiny", load_in_4bit=False, device="cpu", adapter_dir=adapter_dir, trainable=False)
    head = NotePairHead(HeadConfig(hidden_size=64, relevance=relevance)).eval()
    return LoadedExport(manifest={}, threshold=0.5, tokenizer=load_tokenizer("tiny"), model=model, head=head)


def test_packed_relevance_equals_one_case_at_a_time(tiny_adapter):
    from bench.synthetic import inference_cases
    from inference.fast import FastEngine
    from inference.predictions import case_relevance, model_outputs

    plain = _tiny_checkpoint(tiny_adapter)
    cases = inference_cases(6, seed=3)  # 837 to 1254 tokens without answers
    want = [case_relevance(plain, c) for c in cases]
    fast = FastEngine(plain)
    got = fast.predict(cases, relevance=True, max_tokens=2600).relevance  # packs of <= 2600 real tokens
    assert list(got) == [c.case_id for c in cases]
    for case, w in zip(cases, want):
        assert got[case.case_id].shape == (len(case.note_sentences),) and got[case.case_id].dtype == np.float64
        np.testing.assert_allclose(got[case.case_id], w, rtol=0, atol=1e-5)
    stats = fast.report()["alignment"]
    assert stats["forwards"] == 3 and stats["max_tokens"] == 2600
    assert stats["tokens"] == stats["padded_tokens"]  # packed: no padding
    # The pipeline's one entry point, on either path: the same numbers.
    for loaded in (fast, plain):
        scores = model_outputs(loaded, cases, relevance=True, progress=False).relevance
        for case, w in zip(cases, want):
            np.testing.assert_allclose(scores[case.case_id], w, rtol=0, atol=1e-5)
    assert model_outputs(fast, [], relevance=True, progress=False).relevance == {}


def test_one_pass_per_case_serves_subtasks_2_3_and_4(tiny_adapter):
    """A generated case's prefill forward carries its answer sentences: the answers equal
    ``generate``'s and the head's pairs and relevance equal the plain path's, with no forward
    of the head's own; a case without answer sentences still gets its relevance."""
    from bench.synthetic import inference_cases
    from inference.fast import FastEngine
    from inference.predictions import case_relevance

    plain = _tiny_checkpoint(tiny_adapter)
    cases = inference_cases(4, seed=5)
    cases[1].answer_sentences.clear()
    fast = FastEngine(plain)
    got = fast.predict(cases, answers=True, pairs=True, relevance=True, max_new_tokens=5, batch_size=3)
    assert [got.answers[c.case_id] for c in cases] == plain.generate_answers(cases, max_new_tokens=5, batch_size=3)
    assert fast.report()["head_cases"] == {"prefill_shared": 4, "own_forwards": 0}
    assert fast.report()["alignment"]["forwards"] == 0
    assert set(got.pairs) == {c.case_id for c in cases if c.answer_sentences}
    for case, want in zip(cases, plain.score_all(cases, batch_size=1)):
        if case.answer_sentences:
            np.testing.assert_allclose(got.pairs[case.case_id], want, rtol=0, atol=1e-5)
        np.testing.assert_allclose(got.relevance[case.case_id], case_relevance(plain, case), rtol=0, atol=1e-5)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32])
def test_fused_rms_norm_equals_the_qwen3_module_bit_for_bit(x_dtype, w_dtype):
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    from model.fused_ops import rms_norm

    torch.manual_seed(0)
    norm = Qwen3RMSNorm(256, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(256) + 0.5)
    norm = norm.to(w_dtype)
    x = (torch.randn(3, 7, 256) * 4).to(x_dtype)
    want, got = norm(x), rms_norm(norm, x)
    assert got.dtype == want.dtype and torch.equal(got, want)
    other = torch.nn.LayerNorm(256)  # not the Qwen3 formulation: its own forward
    assert torch.equal(rms_norm(other, x.float()), other(x.float()))


def test_packed_forward_equals_the_model_forward_at_every_tapped_layer():
    from model.backbone import backbone_hidden, build_random_base
    from model.packed import PER_SEQUENCE, pack, packed_forward, token_budget_packs

    torch.manual_seed(0)
    model = build_random_base("tiny").eval()
    seqs = [[5 + (7 * i + j) % 900 for j in range(n)] for i, n in enumerate((40, 13, 77))]
    for tap in (0, 1, -1):
        hidden, _ = packed_forward(model, pack(seqs, torch.device("cpu")), tap=tap, attention=PER_SEQUENCE)
        start = 0
        for s in seqs:
            _, want = backbone_hidden(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long), tap)
            torch.testing.assert_close(hidden[start : start + len(s)], want[0], rtol=0, atol=1e-5)
            start += len(s)
    assert token_budget_packs([40, 13, 77, 200], 120) == [[3], [2, 0], [1]]


def test_packed_relevance_is_refused_without_relevance_output(tiny_adapter):
    from bench.synthetic import inference_cases
    from plumbing.errors import InputError
    from inference.fast import FastEngine
    from inference.predictions import model_outputs

    plain = _tiny_checkpoint(tiny_adapter, relevance=False)
    fast = FastEngine(plain)
    cases = inference_cases(2, seed=3)
    for loaded in (fast, plain):  # both paths: the same one-line error, before any forward
        with pytest.raises(InputError, match="no relevance output"):
            model_outputs(loaded, cases, answers=True, relevance=True, progress=False)
    assert fast.report()["alignment"]["forwards"] == 0 and fast.decode.new_tokens == 0


def test_packed_forwards_queue_ahead_of_the_host(tiny_adapter, monkeypatch):
    """The host encodes the rest of the cases after the first part's forwards are queued, and
    reads a pack's outputs only after queuing the next: on a GPU both run while it computes.
    The numbers equal the one-go path's."""
    from bench.synthetic import inference_cases
    from inference import fast as fast_module

    plain = _tiny_checkpoint(tiny_adapter)
    cases = inference_cases(6, seed=3)
    want = fast_module.FastEngine(plain).predict(cases, pairs=True, relevance=True, max_tokens=2600)
    events: list[tuple[str, int]] = []
    real_encode, real_pass, real_record = (
        fast_module.encode_examples,
        fast_module.packed_head_pass,
        fast_module._PackOnItsWay.record,
    )

    def encode(tokenizer, examples, **kwargs):
        events.append(("encode", len(examples)))
        return real_encode(tokenizer, examples, **kwargs)

    def head_pass(model, head, group, attention):
        events.append(("pass", len(events)))
        return real_pass(model, head, group, attention)

    def record(self, work):
        events.append(("record", len(self.cases)))
        return real_record(self, work)

    monkeypatch.setattr(fast_module, "encode_examples", encode)
    monkeypatch.setattr(fast_module, "packed_head_pass", head_pass)
    monkeypatch.setattr(fast_module._PackOnItsWay, "record", record)
    fast = fast_module.FastEngine(plain)
    assert fast.first_wave_share is None  # on the CPU nothing runs ahead of the host: one go
    fast.first_wave_share = 3  # as on a GPU: a first third (2 cases), then the rest
    got = fast.predict(cases, pairs=True, relevance=True, max_tokens=2600)
    kinds = [kind for kind, _ in events]
    assert [n for kind, n in events if kind == "encode"] == [2, 4]
    assert kinds[0] == "encode" and kinds[1] == "pass" and kinds.index("encode", 1) < kinds.index("record")
    # pass, pass, record, pass, record, ..., record: each pack read after the next is queued
    assert kinds[-1] == "record" and kinds.count("pass") == kinds.count("record") == fast.alignment["forwards"]
    queued = [i for i, kind in enumerate(kinds) if kind == "pass"]
    read = [i for i, kind in enumerate(kinds) if kind == "record"]
    assert all(r > q for r, q in zip(read, queued[1:]))
    assert sum(n for kind, n in events if kind == "record") == len(cases)
    assert list(got.pairs) == list(got.relevance) == [c.case_id for c in cases]
    for case in cases:
        assert got.pairs[case.case_id].dtype == np.float64
        np.testing.assert_allclose(got.pairs[case.case_id], want.pairs[case.case_id], rtol=0, atol=1e-6)
        np.testing.assert_allclose(got.relevance[case.case_id], want.relevance[case.case_id], rtol=0, atol=1e-6)
    assert fast.report()["head_cases"] == {"prefill_shared": 0, "own_forwards": len(cases)}


def test_packed_head_forwards_halve_their_budget_after_out_of_memory(tiny_adapter, monkeypatch):
    from bench.synthetic import inference_cases
    from inference import fast as fast_module
    from model import head_scoring

    real = head_scoring.packed_forward
    sizes = []

    def flaky(model, packed, **kwargs):
        sizes.append(len(packed.lengths))
        if len(packed.lengths) > 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, packed, **kwargs)

    monkeypatch.setattr(head_scoring, "packed_forward", flaky)
    said = []
    plain = _tiny_checkpoint(tiny_adapter)
    fast = fast_module.FastEngine(plain, log=said.append)
    cases = inference_cases(3, seed=3)
    got = fast.predict(cases, relevance=True, max_tokens=4000).relevance
    assert all(got[c.case_id].shape == (len(c.note_sentences),) for c in cases)
    assert fast.alignment["max_tokens"] == 1000 and sizes[-3:] == [1, 1, 1]
    assert len(said) == 2 and all(m.startswith("warning: alignment ran out of memory") for m in said)
    assert fast.report()["fallbacks"] == [m.removeprefix("warning: ") for m in said]


# --- the adapter folded into dense weights without PEFT's wrappers (issue 22: load time) ----------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_direct_lora_merge_equals_peft_merge_and_unload_bit_for_bit(tiny_adapter, dtype):
    from peft import PeftModel

    from model.backbone import build_random_base
    from model.lora_merge import merge_adapter

    torch.manual_seed(3)
    base = build_random_base("tiny").to(dtype)
    ours = build_random_base("tiny").to(dtype)
    ours.load_state_dict(base.state_dict())
    want = PeftModel.from_pretrained(base, str(tiny_adapter), is_trainable=False).merge_and_unload().state_dict()
    assert merge_adapter(ours, tiny_adapter)
    got = ours.state_dict()
    assert want.keys() == got.keys()
    before = {k: v.to(dtype) for k, v in build_random_base("tiny").state_dict().items()}
    changed = [k for k in got if not torch.equal(got[k], before[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)  # the fold moved the targets only
    assert all(torch.equal(want[k], got[k]) for k in want), [k for k in want if not torch.equal(want[k], got[k])][:3]


def test_direct_lora_merge_refuses_what_it_does_not_reproduce(tiny_adapter, tmp_path):
    """DoRA, a bias, extra saved modules or a foreign key: nothing changes and PEFT merges instead."""
    import json
    import shutil

    from model.backbone import build_random_base
    from model.lora_merge import merge_adapter, plain_lora_scale

    config = json.loads((tiny_adapter / "adapter_config.json").read_text())
    assert plain_lora_scale(config) == config["lora_alpha"] / config["r"]
    assert plain_lora_scale({**config, "use_rslora": True}) == pytest.approx(config["lora_alpha"] / config["r"] ** 0.5)
    for change in ({"use_dora": True}, {"bias": "all"}, {"modules_to_save": ["lm_head"]}, {"peft_type": "IA3"}):
        assert plain_lora_scale({**config, **change}) is None
        folder = tmp_path / str(len(list(tmp_path.iterdir())))
        shutil.copytree(tiny_adapter, folder)
        (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
        model = build_random_base("tiny")
        before = {k: v.clone() for k, v in model.state_dict().items()}
        assert not merge_adapter(model, folder)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not merge_adapter(build_random_base("tiny"), tmp_path / "missing")
