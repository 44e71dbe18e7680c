"""`accel app` as a command: what it refuses before it loads anything, and what it prints while it starts.

Paths and the port are checked in a moment, before the imports and the model load (one ``accel: error:`` line
naming the option); start-up says what it is loading, then where it serves, and none of gradio's hints.
"""

import os
import socket

import pytest

pytest.importorskip("gradio", reason="the web app needs gradio: pip install 'diffusers-accel[app]'")

from accel import cli  # noqa: E402


@pytest.fixture
def no_serving(monkeypatch):
    """`accel app` up to the point where it would load the model: the calls that got that far."""
    import accel.web.serve

    calls = []
    monkeypatch.setattr(accel.web.serve, "serve_model", lambda opts, pcfg=None: calls.append(opts) or 0)
    return calls


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("flag", ["--out-dir", "--approx-cache"])
def test_a_file_where_a_folder_goes_is_refused_before_loading(tmp_path, capsys, no_serving, flag):
    taken = tmp_path / "a-file"
    taken.write_text("not a folder")
    out = ["--out-dir", str(tmp_path / "out")] if flag != "--out-dir" else []
    assert cli.main(["app", "--model", "tiny-sd15", "--port", str(_free_port()), *out, flag, str(taken)]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"accel: error: {flag}: ") and "is a file, not a folder" in line, line
    assert not no_serving and "loading" not in captured.out  # nothing was imported or loaded for it


def test_a_missing_out_dir_is_created(tmp_path, no_serving):
    out = tmp_path / "new" / "outputs"
    assert cli.main(["app", "--model", "tiny-sd15", "--port", str(_free_port()), "--out-dir", str(out),
                     "--approx-cache", str(tmp_path / "cache")]) == 0
    assert out.is_dir() and (tmp_path / "cache").is_dir() and len(no_serving) == 1


def test_a_busy_port_is_refused_before_loading_naming_port(tmp_path, capsys, no_serving):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli.main(["app", "--model", "tiny-sd15", "--port", str(port), "--out-dir", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(f"accel: error: --port {port}: 127.0.0.1:{port} is in use") and "give another --port" in line
    assert "GRADIO_SERVER_PORT" not in line and "launch()" not in line
    assert not no_serving and "loading" not in captured.out


def test_start_up_says_what_it_loads_then_where_it_serves(tmp_path, capsys, monkeypatch):
    import gradio as gr

    for name in ("GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE"):  # the app points gradio at its own cache: put back
        monkeypatch.setenv(name, os.environ.get(name, str(tmp_path / "gradio-default")))
    served = []

    def block_thread(demo):  # instead of serving until Ctrl+C: note that it served, and stop
        served.append(demo.local_url)
        demo.close()

    monkeypatch.setattr(gr.Blocks, "block_thread", block_thread)
    port = _free_port()
    assert cli.main(["app", "--model", "tiny-sd15", "--port", str(port), "--out-dir", str(tmp_path / "out")]) == 0
    # (the last line, "Closing server ...", is the test's own demo.close())
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip() and not ln.startswith("Closing server")]
    assert served == [f"http://127.0.0.1:{port}/"]
    assert lines[0].startswith("accel app: loading tiny-sd15")  # before the imports and the model load
    assert lines[-1] == f"accel app: serving on http://127.0.0.1:{port}/ (Ctrl+C stops it)", lines
    assert not [ln for ln in lines if "share=True" in ln or "public link" in ln or "launch()" in ln], lines


def test_a_port_taken_after_the_check_names_the_port(tmp_path, tiny_cache, monkeypatch):
    import accel
    from accel.web.page import build_app, serve

    for name in ("GRADIO_TEMP_DIR", "GRADIO_EXAMPLES_CACHE"):
        monkeypatch.setenv(name, os.environ.get(name, str(tmp_path / "gradio-default")))
    pipe = tiny_cache("sd15")
    demo = build_app(pipe, "tiny-sd15", out_dir=tmp_path)
    try:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            with pytest.raises(OSError, match=f"port {port} on 127.0.0.1 is in use") as err:
                serve(demo, port=port, block=False)
        assert "GRADIO_SERVER_PORT" not in str(err.value)
    finally:
        demo.close()
        accel.remove(pipe)
