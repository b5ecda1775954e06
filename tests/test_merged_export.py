"""``train.py export RUN --merged``: a plain Hugging Face folder (bf16, sharded safetensors, config,
tokenizer) that ``AutoModelForCausalLM.from_pretrained`` loads without PEFT or remote code and that
decodes what the adapter path decodes; and the model cards' Hub metadata (YAML front matter)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml  # PyYAML: a dependency of accelerate and transformers, so always installed

import train
from data.archehr import load_xml
from data.prompts import chat_prompt, example_from_case
from model.backbone import load_base_model
from model.loaded_export import load_export, stop_ids
from model.export_folder import ExportManifest, model_card
from model.merged_export import MERGED_RECORD
from training.config import build_config
from training.run import run_training

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
XML, KEY = EXAMPLES / "archehr-qa.xml", EXAMPLES / "archehr-qa_key.json"
NEW_TOKENS = 20

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A one-step tiny task run whose LoRA B matrices are then set to seeded random values: one step
    on a random tiny model barely moves the weights, and the test needs an adapter that changes
    what the model generates (else merging or not would decode the same tokens)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("merged") / "run"
    run_training(
        build_config(
            dict(
                stage="task",
                joint=True,
                preset="tiny",
                xml=str(XML),
                key=str(KEY),
                out=str(out),
                max_steps=1,
                batch_size=1,
                log_every=1,
                progress=False,
                plot=False,
            )
        )
    )
    adapter = out / "export" / "adapter_model.safetensors"
    generator = torch.Generator().manual_seed(1)
    weights = {
        k: torch.randn(v.shape, generator=generator) * 0.5 if "lora_B" in k else v
        for k, v in load_file(str(adapter)).items()
    }
    save_file(weights, str(adapter), metadata={"format": "pt"})
    return out


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


def _prompt_ids(tokenizer) -> list[torch.Tensor]:
    prompts = [chat_prompt(tokenizer, example_from_case(c, with_answer=False))[0] for c in load_xml(XML)]
    return [tokenizer(p, return_tensors="pt", add_special_tokens=False)["input_ids"] for p in prompts]


def _greedy(model, prompts: list[torch.Tensor], tokenizer) -> list[list[int]]:
    out = []
    for ids in prompts:
        seq = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=stop_ids(tokenizer),
        )
        out.append(seq[0, ids.shape[1] :].tolist())
    return out


def _export(capsys, *args: str) -> Path:
    assert train.main(["export", *args]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("merged: ")
    return Path(line.removeprefix("merged: "))


def test_merged_folder_is_a_plain_hf_model_that_decodes_like_the_adapter(run, tmp_path, capsys):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _export(capsys, str(run), "--merged", "--max_shard_size", "5MB")
    assert folder == run / "export" / "merged"  # beside the adapter and the head
    names = {p.name for p in folder.iterdir()}
    assert {
        "config.json",
        "model.safetensors.index.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        MERGED_RECORD,
        "README.md",
    } <= names
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 2 and not (names & {"adapter_config.json", "adapter_model.safetensors"})
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["Qwen3ForCausalLM"]
    with safe_open(str(shards[0]), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((folder / "generation_config.json").read_text())["do_sample"] is False

    adapter = load_export(run, device="cpu", merge=False)  # the adapter path (fp32 base + LoRA)
    tok = AutoTokenizer.from_pretrained(folder)
    prompts = _prompt_ids(tok)
    assert [p.tolist() for p in prompts] == [p.tolist() for p in _prompt_ids(adapter.tokenizer)]
    reference = _greedy(adapter.model, prompts, tok)
    assert reference != _greedy(load_base_model("tiny", device="cpu"), prompts, tok)  # the adapter matters

    merged = AutoModelForCausalLM.from_pretrained(folder)  # plain transformers: no PEFT, no remote code
    assert merged.dtype == torch.bfloat16
    # Along the adapter path's greedy tokens, the bf16 merged model's logits (bf16 weights and
    # activations) stay within 5% of the largest logit and pick the same token wherever the
    # adapter's choice is not a near tie (random weights leave many near ties).
    worst, agree = 0.0, []
    for ids, new in zip(prompts, reference):
        seq = torch.cat([ids, torch.tensor([new])], dim=1)
        with torch.no_grad():
            want = adapter.model(input_ids=seq).logits[0, ids.shape[1] - 1 : -1].float()
            got = merged(input_ids=seq).logits[0, ids.shape[1] - 1 : -1].float()
        worst = max(worst, float((got - want).abs().max() / want.abs().max()))
        top2 = want.topk(2).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.05 * want.abs().max()
        agree += (got.argmax(-1) == want.argmax(-1))[clear].tolist()
    assert worst < 0.05 and len(agree) >= 10 and all(agree), (worst, agree)

    # In float32 the merged folder generates exactly the adapter path's greedy tokens.
    fp32 = _export(capsys, str(run), "--merged", "--dtype", "float32", "--out", str(tmp_path / "fp32"))
    assert _greedy(AutoModelForCausalLM.from_pretrained(fp32, dtype=torch.float32), prompts, tok) == reference

    record = json.loads((folder / MERGED_RECORD).read_text())
    assert record["dtype"] == "bfloat16" and record["merged_into"] == "the unquantised base"
    card = (folder / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "transformers" and "archehr" in meta["tags"]
    assert "alignment head is not in it" in card


def test_export_again_replaces_the_merged_folder_and_refuses_a_foreign_one(run, tmp_path, capsys):
    first = _export(capsys, str(run), "--merged", "--out", str(tmp_path / "m"))
    stamp = json.loads((first / MERGED_RECORD).read_text())["created"]
    again = _export(capsys, str(run / "export"), "--merged", "--out", str(tmp_path / "m"))  # re-runnable
    assert again == first and json.loads((again / MERGED_RECORD).read_text())["created"] >= stamp
    assert not list(tmp_path.glob(".m.partial*"))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as stop:
        train.main(["export", str(run), "--merged", "--out", str(foreign)])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds other files" in err[0]
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    with pytest.raises(SystemExit) as stop:
        train.main(["export", str(run), "--merged", "--max_shard_size", "lots", "--out", str(tmp_path / "n")])
    assert stop.value.code == 2 and "--max_shard_size must be a size" in capsys.readouterr().err
    assert not (tmp_path / "n").exists()


LADDER = {
    "evaluated_on": "held-out cases",
    "n_folds": 5,
    "n_cases": 20,
    "key": "/data/dev/archehr-qa_key.json",
    "subtask2": {
        "available": True,
        "rows": [
            {"system": "question-retrieval", "scores": {"strict_micro_f1": 40.0}},
            {
                "system": "head",
                "scores": {
                    "strict_micro_f1": 55.5,
                    "strict_micro_precision": 60.0,
                    "strict_micro_recall": 51.0,
                    "lenient_micro_f1": 58.0,
                },
            },
        ],
    },
    "subtask3": [
        {"system": "extractive", "scores": {"bleu": 9.0}},
        {"system": "model", "scores": {"bleu": 11.7, "rouge1": 36.0, "sari": 54.3, "bertscore": None}},
    ],
    "subtask4": [
        {"system": "bm25-top1", "scores": {"micro_f1": 50.0}},
        {
            "system": "head",
            "scores": {"micro_f1": 61.2, "micro_precision": 70.0, "micro_recall": 54.4, "macro_f1": 60.1},
        },
    ],
}


def test_model_card_front_matter_holds_hub_metadata_and_cv_scores():
    manifest = {
        "preset": "qwen3-4b",
        "base_model": {"id": "Qwen/Qwen3-4B", "preset": "qwen3-4b"},
        "stages": [{"stage": "domain"}, {"stage": "task", "joint": True}],
    }
    meta = _front_matter(model_card(ExportManifest.from_dict(manifest), dict(LADDER, source="runs/cv/ladder.json")))
    assert meta["base_model"] == "Qwen/Qwen3-4B" and meta["library_name"] == "peft"
    assert {"archehr", "clinical-nlp", "qlora"} <= set(meta["tags"])
    [entry] = meta["model-index"]
    got = {r["task"]["name"].split(":")[0]: {m["type"]: m["value"] for m in r["metrics"]} for r in entry["results"]}
    assert got == {  # the fine-tuned systems only (not the baselines); a score not computed is left out
        "ArchEHR-QA Subtask 2": {
            "strict_micro_f1": 55.5,
            "strict_micro_precision": 60.0,
            "strict_micro_recall": 51.0,
            "lenient_micro_f1": 58.0,
        },
        "ArchEHR-QA Subtask 3": {"bleu": 11.7, "rouge1": 36.0, "sari": 54.3},
        "ArchEHR-QA Subtask 4": {"micro_f1": 61.2, "micro_precision": 70.0, "micro_recall": 54.4, "macro_f1": 60.1},
    }
    assert all(r["dataset"]["split"] == "held-out folds of archehr-qa_key.json" for r in entry["results"])
    # A local base folder is not a hub id: no base_model claim; no cv run: no model-index.
    local = _front_matter(
        model_card(
            ExportManifest.from_dict({"preset": "qwen3-4b", "stages": [], "base_model": {"id": "/models/qwen3-4b"}})
        )
    )
    assert "base_model" not in local and "model-index" not in local and local["library_name"] == "peft"
    training = _front_matter(
        model_card(ExportManifest.from_dict(manifest), dict(LADDER, evaluated_on="TRAINING CASES", source="x"))
    )
    assert "TRAINING CASES" in training["model-index"][0]["results"][0]["dataset"]["split"]


def test_cv_scores_reach_both_cards(run, tmp_path, capsys):
    cv = tmp_path / "cv"
    cv.mkdir()
    (cv / "ladder.json").write_text(json.dumps(LADDER))
    folder = _export(capsys, str(run), "--merged", "--cv", str(cv), "--out", str(tmp_path / "m"))
    for card in (folder / "README.md", run / "export" / "README.md"):
        meta = _front_matter(card.read_text())
        assert meta["model-index"][0]["results"][2]["metrics"][0] == {
            "type": "micro_f1",
            "value": 61.2,
            "name": "micro_f1 (5-fold case-grouped CV)",
        }
        assert "base_model" not in meta and "random-init-test-model" in meta["tags"]  # tiny: random weights
        assert str(cv / "ladder.json") in card.read_text()  # where the scores come from
    with pytest.raises(SystemExit) as stop:
        train.main(["export", str(run), "--merged", "--cv", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m")])
    assert stop.value.code == 2


def test_an_nf4_trained_adapter_is_merged_into_the_dequantised_base(tmp_path, capsys):
    """QLoRA: the adapter was trained against the NF4 base, so the merge dequantises that base (as
    the training forward computed it) instead of loading full-precision weights it never saw."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    run_training(
        build_config(
            dict(
                stage="task",
                preset="tiny",
                xml=str(XML),
                key=str(KEY),
                out=str(run),
                max_steps=1,
                batch_size=1,
                log_every=1,
                progress=False,
                plot=False,
                load_in_4bit="true",
            )
        )
    )
    folder = _export(capsys, str(run), "--merged", "--dtype", "float32")
    assert json.loads((folder / MERGED_RECORD).read_text())["merged_into"] == "the NF4 base dequantised as trained"
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    adapter = load_export(run, device="cpu", merge=False, load_in_4bit=True)
    merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    unquantised = load_base_model("tiny", device="cpu", load_in_4bit=False)  # what a naive merge would start from
    [ids] = _prompt_ids(adapter.tokenizer)[:1]
    with torch.no_grad():
        want = adapter.model(input_ids=ids).logits.float()
        got = merged(input_ids=ids).logits.float()
        naive = unquantised(input_ids=ids).logits.float()
    scale = want.abs().max()
    assert float((got - want).abs().max() / scale) < 0.02 < float((naive - want).abs().max() / scale)
