"""glmkit.tools.calculator and glmkit.tools.builtins: exact arithmetic that never executes anything, the
workspace confinement of read_file / list_files, shell and network tools off unless asked (and offline errors
that read well). Fast: no model, no outside network (the weather test talks to a server on 127.0.0.1)."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import jsonschema
import pytest

from glmkit.tools import builtins
from glmkit.tools.base import Observation
from glmkit.tools.builtins import builtin_tools, network_tools, shell_tool
from glmkit.tools.calculator import CalculatorError, evaluate, format_number
from glmkit.tools.registry import Toolbox, call_tool


def calc(expression: str) -> str:
    return format_number(evaluate(expression))


# --- calculator --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("expression, expected", [
    ("2**100", "1267650600228229401496703205376"),
    ("2^10", "1024"),
    ("2^-1", "0.5"),
    ("1 + 2 * 3", "7"),
    ("(1 + 2) * 3", "9"),
    ("-3**2", "-9"),
    ("(-3)**2", "9"),
    ("--5", "5"),
    ("-(2+3)*+4", "-20"),
    ("7/2", "3.5"),
    ("6/3", "2"),
    ("7//2", "3"),
    ("-7 % 3", "2"),
    ("10**30 / 10**10", "100000000000000000000"),
    ("0.1 + 0.2", "0.3"),
    ("1e3 * 2", "2000"),
    ("sqrt(16)", "4"),
    ("sqrt(2)", "1.4142135623731"),
    ("sqrt(10**100)", "1" + "0" * 50),
    ("factorial(25)", "15511210043330985984000000"),
    ("abs(-3) + round(2.567, 2) + floor(1.9) + ceil(1.1)", "8.57"),
    ("round(2.5)", "2"),
    ("log(8, 2)", "3"),
    ("log(e)", "1"),
    ("exp(0) + sin(0) + cos(0) + tan(0)", "2"),
    ("pi", "3.14159265358979"),
    ("１２＋（３×４）", "24"),
    ("（１＋２）＊３－４／２", "7"),
    ("１００÷４", "25"),
    ("2 × 3 · 4", "24"),
    ("5 − 2", "3"),
    ("3² + 4²", "25"),
    ("2π", None),  # no implicit multiplication: an error, tested below
    ("1 + 1 =", "2"),
    ("  ７  ", "7"),
])
def test_calculator(expression, expected):
    if expected is None:
        with pytest.raises(CalculatorError, match="write products explicitly"):
            evaluate(expression)
    else:
        assert calc(expression) == expected


@pytest.mark.parametrize("expression, message", [
    ("1,000", "without thousands separators"),
    ("2(3+4)", "write multiplication explicitly"),
    ("1/0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("sqrt(-1)", "math error: math domain error"),
    ("log(0)", "math error"),
    ("(-8) ** (1/3)", "not a real number"),
    ("1e308 * 10", "too large"),
    ("2.0 ** 10000", "too large"),
    ("10**400 / 3", "too large"),
    ("x + 1", "unknown name 'x'; constants: pi, e"),
    ("sqrt(1, 2)", r"sqrt\(\) takes 1 argument\(s\), got 2"),
    ("round(1, ndigits=2)", "no keyword arguments"),
    ("factorial(2.5)", "must be a whole number"),
    ("factorial(-1)", "from 0 to 1000"),
    ("'a' * 3", "only numbers are allowed"),
    ("True + 1", "only numbers are allowed"),
    ("1j * 2", "only numbers are allowed"),
    ("1 < 2", "a comparison is not allowed"),
    ("1 << 3", "the operator LShift is not allowed"),
    ("", "empty"),
    ("1 +", "cannot read"),
])
def test_calculator_errors(expression, message):
    with pytest.raises(CalculatorError, match=message):
        evaluate(expression)


@pytest.mark.parametrize("expression", [
    "9**9**9", "10**10**10", "2**2**2**2**2", "(10**5000)", "factorial(1000) * factorial(1000)",
    "factorial(10**9)", "round(5, -10**9)", "2**3**4**5", "(-2)**(2**40)",
])
def test_calculator_refuses_huge_numbers_quickly(expression):
    start = time.monotonic()
    with pytest.raises(CalculatorError):
        evaluate(expression)
    assert time.monotonic() - start < 1


def test_calculator_size_bounds():
    assert calc("factorial(1000)").startswith("402387260077")
    assert len(calc("2**9999")) == 3010
    with pytest.raises(CalculatorError, match="nested"):
        evaluate("-" * 500 + "1")
    with pytest.raises(CalculatorError):
        evaluate("(" * 300 + "1" + ")" * 300)
    with pytest.raises(CalculatorError, match="the limit is 1,000"):
        evaluate("1+" * 600 + "1")
    with pytest.raises(CalculatorError, match="must be text"):
        evaluate(12)


@pytest.mark.parametrize("template", [
    "__import__('os').system('touch {p}')",
    "open('{p}', 'w')",
    "(lambda: __import__('os').system('touch {p}'))()",
    "[__import__('os').system('touch {p}') for _ in (1,)]",
    "().__class__.__base__.__subclasses__()",
    "exec(\"open('{p}', 'w')\")",
    "eval(\"open('{p}', 'w')\")",
    "(f := open('{p}', 'w'))",
    "sqrt.__globals__['__builtins__']['open']('{p}', 'w')",
    "abs(open('{p}', 'w'))",
    "1 if open('{p}', 'w') else 2",
    "__builtins__",
])
def test_calculator_never_executes_anything(tmp_path, template):
    marker = tmp_path / "pwned"
    with pytest.raises(CalculatorError):
        evaluate(template.format(p=marker))
    out = call_tool(builtins.calculator.tool, {"expression": template.format(p=marker)})
    assert out.error and out.text.startswith("calculator failed: CalculatorError: ")
    assert not marker.exists()


def test_calculator_tool():
    assert call_tool(builtins.calculator.tool, '{"expression": "2**100"}').text == "1267650600228229401496703205376"
    assert calc("2**100") == str(2 ** 100)


# --- current_time, random_number ---------------------------------------------------------------------------

def test_current_time():
    out = call_tool(builtins.current_time.tool, {"timezone": "Asia/Shanghai"})
    assert not out.error and out.text.endswith("Asia/Shanghai (UTC+0800)")
    assert call_tool(builtins.current_time.tool, {"timezone": "UTC"}).text.endswith("UTC (UTC+0000)")
    assert "local time" in call_tool(builtins.current_time.tool, {}).text
    for zone in ("Mars/Olympus", "../../etc/passwd", ""):
        out = call_tool(builtins.current_time.tool, {"timezone": zone})
        assert out.error and f"unknown time zone {zone!r}; use an IANA name" in out.text


def test_random_number():
    number = builtins.random_number.tool
    first = call_tool(number, {"seed": 7, "low": 1, "high": 10**6}).text
    assert first == call_tool(number, {"seed": 7, "low": 1, "high": 10**6}).text
    assert all(1 <= int(call_tool(number, {"low": 1, "high": 3}).text) <= 3 for _ in range(20))
    assert 0 <= int(call_tool(number).text) <= 100
    assert "low=5 is greater than high=1" in call_tool(number, {"low": 5, "high": 1}).text
    out = call_tool(number, {"high": 10**30})
    assert out.error and "argument 'high' = 1000000000000000000000000000000" in out.text


# --- workspace ------------------------------------------------------------------------------------------

@pytest.fixture
def workspace(tmp_path):
    root = tmp_path / "ws"
    (root / "docs").mkdir(parents=True)
    (root / "notes.txt").write_text("line 1\nline 2\n第三行\n", encoding="utf-8")
    (root / "docs" / "a.md").write_text("# A\n")
    (root / "gbk.txt").write_bytes("你好，世界".encode("gbk"))
    (root / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(100))
    (tmp_path / "secret.txt").write_text("top secret")
    (root / "link_out").symlink_to(tmp_path / "secret.txt")
    (root / "dir_out").symlink_to(tmp_path)
    (root / "link_in").symlink_to(root / "notes.txt")
    return root


def box_for(root, **kw) -> Toolbox:
    return Toolbox(builtin_tools(root, **kw))


def test_read_file(workspace):
    box = box_for(workspace)
    assert box.call("read_file", {"path": "notes.txt"}).text == "notes.txt (lines 1-3 of 3)\nline 1\nline 2\n第三行"
    assert box.call("read_file", {"path": "notes.txt", "start_line": 3}).text.endswith("(lines 3-3 of 3)\n第三行")
    assert box.call("read_file", {"path": "link_in"}).text.endswith("第三行")
    assert box.call("read_file", {"path": str(workspace / "docs/a.md")}).text.endswith("# A")
    assert box.call("read_file", {"path": "gbk.txt"}).text.endswith("你好，世界")
    binary = box.call("read_file", {"path": "image.png"})
    assert not binary.error and binary.text == "'image.png' is a binary file (116 bytes); not shown"
    assert "is a directory; use list_files" in box.call("read_file", {"path": "docs"}).text
    assert "no file 'nope.txt' in the workspace" in box.call("read_file", {"path": "nope.txt"}).text


def test_read_file_pages_long_files(workspace):
    (workspace / "long.txt").write_text("\n".join(f"row {n}" for n in range(1, 1001)))
    box = box_for(workspace)
    first = box.call("read_file", {"path": "long.txt"}).text
    assert first.startswith("long.txt (lines 1-400 of 1000)\nrow 1\n") and first.endswith("row 400")
    assert box.call("read_file", {"path": "long.txt", "start_line": 990}).text.endswith("row 1000")
    assert box.call("read_file", {"path": "long.txt", "start_line": 1001}).text == (
        "long.txt has 1000 lines; start_line 1001 is past the end")


def test_read_file_size_cap(workspace, monkeypatch):
    monkeypatch.setattr(builtins, "MAX_FILE_BYTES", 10)
    out = box_for(workspace).call("read_file", {"path": "notes.txt"})
    assert out.error and "files over 10 bytes are not read" in out.text


@pytest.mark.parametrize("path", ["../secret.txt", "docs/../../secret.txt", "link_out", "dir_out/secret.txt",
                                  "/etc/passwd", "SECRET"])
def test_workspace_confinement(workspace, path):
    if path == "SECRET":
        path = str(workspace.parent / "secret.txt")
    box = box_for(workspace)
    for name in ("read_file", "list_files"):
        out = box.call(name, {"path": path})
        assert out.error and f"{path!r} is outside the workspace" in out.text
        assert "top secret" not in out.text


def test_list_files(workspace):
    box = box_for(workspace)
    top = box.call("list_files").text.splitlines()
    assert top[:2] == ["dir_out/", "docs/"]
    assert "notes.txt (24 bytes)" in top and "link_out (10 bytes)" in top and "docs/a.md (4 bytes)" not in top
    deep = box.call("list_files", {"recursive": True}).text.splitlines()
    assert "docs/a.md (4 bytes)" in deep and not any(line.startswith("dir_out/") and line != "dir_out/"
                                                      for line in deep)  # symlinked folders are not entered
    assert box.call("list_files", {"path": "docs"}).text == "docs/a.md (4 bytes)"
    (workspace / "empty").mkdir()
    assert box.call("list_files", {"path": "empty"}).text == "'empty' is empty"
    assert "not a directory" in box.call("list_files", {"path": "notes.txt"}).text


def test_list_files_caps_entries(workspace):
    many = workspace / "many"
    many.mkdir()
    for n in range(250):
        (many / f"f{n:03}").write_text("")
    out = box_for(workspace).call("list_files", {"path": "many"}).text
    assert len(out.splitlines()) == 201 and out.endswith("[... 50 more entries not shown]")


def test_builtin_tools_sets(workspace):
    assert [t.name for t in builtin_tools(workspace)] == ["calculator", "current_time", "random_number",
                                                           "read_file", "list_files"]
    everything = builtin_tools(workspace, allow_shell=True, allow_network=True)
    assert [t.name for t in everything][5:] == ["shell", "get_weather", "fetch_url"]
    for t in everything:
        jsonschema.Draft202012Validator.check_schema(t.parameters)
        assert t.description
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        builtin_tools(workspace / "missing")


# --- shell ---------------------------------------------------------------------------------------------

def test_shell(workspace, caplog):
    with caplog.at_level(logging.WARNING, logger="glmkit"):
        shell = shell_tool(workspace)
    assert "can run arbitrary commands" in caplog.text
    assert "arbitrary commands" in shell.description
    out = call_tool(shell, {"command": "pwd && echo 你好"})
    assert out == Observation(f"exit code 0\n{workspace.resolve()}\n你好\n")
    failed = call_tool(shell, {"command": "echo oops >&2; exit 3"})
    assert failed.error and failed.text == "exit code 3\noops\n"


def test_shell_timeout_kills_the_command(workspace):
    marker = workspace / "late"
    shell = shell_tool(workspace, timeout_s=0.3)
    start = time.monotonic()
    out = call_tool(shell, {"command": f"echo started; sleep 1; touch {marker}"})
    assert time.monotonic() - start < 1
    assert out.error and out.text == "killed after 0.3 s\nstarted\n"
    time.sleep(1.2)
    assert not marker.exists()  # the whole process group died, not only the shell


# --- network tools ---------------------------------------------------------------------------------------

def test_network_tools_offline_give_clear_errors():
    weather, fetch = network_tools(weather_url="http://127.0.0.1:1", timeout_s=1)
    out = call_tool(weather, {"city": "北京"})
    assert out.error and "could not get http://127.0.0.1:1/" in out.text
    assert "the network may be unavailable" in out.text
    assert "Traceback" not in out.text
    out = call_tool(fetch, {"url": "http://127.0.0.1:1/page"})
    assert out.error and out.text.startswith("fetch_url failed: ConnectionError: could not get http://127.0.0.1:1/page")
    out = call_tool(fetch, {"url": "file:///etc/passwd"})
    assert out.error and "is not an http:// or https:// address" in out.text


WTTR = {"current_condition": [{"temp_C": "21", "FeelsLikeC": "20", "humidity": "40",
                               "weatherDesc": [{"value": "Sunny"}], "localObsDateTime": "2024-05-01 09:00 AM"}]}


@pytest.fixture
def local_server():
    """An HTTP server on 127.0.0.1 answering /北京 with wttr.in-style JSON, /page with HTML, others with 404."""
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.startswith("/%E5%8C%97%E4%BA%AC?format=j1"):
                body, kind, status = json.dumps(WTTR).encode(), "application/json", 200
            elif self.path == "/page":
                body, kind, status = (b"<html><head><style>p {}</style><script>alert(1)</script></head>"
                                      b"<body><h1>Title</h1><p>Hello &amp; welcome</p></body></html>",
                                      "text/html; charset=utf-8", 200)
            elif self.path == "/blob":
                body, kind, status = bytes(1000), "application/octet-stream", 200
            else:
                body, kind, status = b"not found", "text/plain", 404
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_network_tools_against_a_local_server(local_server):
    weather, fetch = network_tools(weather_url=local_server, timeout_s=2)
    assert json.loads(call_tool(weather, {"city": "北京"}).text) == {
        "city": "北京", "temperature_c": "21", "feels_like_c": "20", "humidity_percent": "40",
        "conditions": "Sunny", "observed_at": "2024-05-01 09:00 AM"}
    out = call_tool(weather, {"city": "Atlantis"})
    assert out.error and "answered HTTP 404" in out.text
    page = call_tool(fetch, {"url": f"{local_server}/page"})
    assert page == Observation(f"HTTP 200 {local_server}/page\nTitle Hello & welcome")
    blob = call_tool(fetch, {"url": f"{local_server}/blob"}).text
    assert blob.endswith("application/octet-stream content (1,000 bytes), not text; not shown")
