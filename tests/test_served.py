"""``python -m inference.served``: Subtask 3 from an OpenAI-compatible server (a fake one on
127.0.0.1 here) with our prompts, greedy settings, answer cleaning and official validation."""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from data.archehr import load_xml
from data.prompts import chat_prompt, example_from_case
from data.submission import read_submission
from inference import served
from model.backbone import load_tokenizer

XML = Path(__file__).resolve().parents[1] / "examples" / "archehr-qa.xml"


@pytest.fixture()
def tokenizer_dir(tmp_path) -> Path:
    folder = tmp_path / "merged"
    load_tokenizer("tiny").save_pretrained(folder)
    return folder


@pytest.fixture()
def server():
    """A completions endpoint that records each request and answers from ``replies``."""
    requests: list[dict] = []
    replies: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append({"path": self.path, **body})
            # Returned in reverse order: the client must put them back by index.
            choices = [{"index": i, "text": replies[i % len(replies)]} for i in range(len(body["prompt"]))][::-1]
            payload = json.dumps({"choices": choices}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", requests, replies
    httpd.shutdown()
    httpd.server_close()


def test_served_answers_become_a_valid_subtask3_submission(server, tokenizer_dir, tmp_path, capsys):
    url, requests, replies = server
    long = " ".join(["The patient was monitored closely."] * 30)
    replies += ["  The medication was stopped because of kidney injury. ", "", long]
    out = tmp_path / "served"
    assert (
        served.main(
            [str(XML), "--url", url, "--model", "archehr", "--tokenizer", str(tokenizer_dir), "--out", str(out)]
        )
        == 0
    )
    cases = load_xml(XML)
    [request] = requests
    assert request["path"] == "/v1/completions" and request["model"] == "archehr"
    assert request["temperature"] == 0.0 and "<|im_end|>" in request["stop"] and request["max_tokens"] == 100
    tok = load_tokenizer("tiny")
    assert request["prompt"] == [chat_prompt(tok, example_from_case(c, with_answer=False))[0] for c in cases]
    entries = {e["case_id"]: e["prediction"] for e in read_submission(out / "subtask3.zip", 3)}
    assert list(entries) == [c.case_id for c in cases]
    assert entries[cases[0].case_id] == "The medication was stopped because of kidney injury."
    assert len(entries[cases[2].case_id].split()) <= 75  # cut to the official limit
    err = capsys.readouterr().err
    assert f"case {cases[1].case_id}: the served answer was empty" in err  # never silent


def test_an_unreachable_server_is_one_line(tokenizer_dir, tmp_path, capsys):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SystemExit) as stop:
        served.main(
            [
                str(XML),
                "--url",
                f"http://127.0.0.1:{port}/v1",
                "--model",
                "archehr",
                "--tokenizer",
                str(tokenizer_dir),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot reach the server" in err[0]
    assert not (tmp_path / "o").exists()
