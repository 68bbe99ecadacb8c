"""glmkit.tools.registry: schemas from typed functions, tool names, call_tool's answers to good and bad calls
(never raising), the Toolbox and loading a user's tools file. Fast: no model, no network."""

from __future__ import annotations

import enum
import json
import sys
import textwrap
import threading
import time
from typing import Annotated, Any, Literal, Optional

import jsonschema
import pytest

from glmkit.tools.base import Image, Observation, Tool
from glmkit.tools.registry import MAX_OBSERVATION_CHARS, Toolbox, call_tool, from_schema, load_tools_file, tool
from glmkit.tools.signatures import ToolDefinitionError, function_tool, parse_docstring


class Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


class Field:
    """Stands for pydantic's Field: any metadata object with a `description`."""

    def __init__(self, description):
        self.description = description


def params(fn) -> dict:
    schema = function_tool(fn).parameters
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def prop(annotation) -> dict:
    """The schema generated for one required parameter of type `annotation`."""
    def fn(x): ...
    fn.__annotations__ = {"x": annotation}
    return params(fn)["properties"]["x"]


# --- schemas -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("annotation, expected", [
    (str, {"type": "string"}),
    (int, {"type": "integer"}),
    (float, {"type": "number"}),
    (bool, {"type": "boolean"}),
    (Any, {}),
    (list, {"type": "array"}),
    (list[int], {"type": "array", "items": {"type": "integer"}}),
    (list[list[str]], {"type": "array", "items": {"type": "array", "items": {"type": "string"}}}),
    (tuple[int, ...], {"type": "array", "items": {"type": "integer"}}),
    (tuple[int, int], {"type": "array", "prefixItems": [{"type": "integer"}] * 2, "minItems": 2, "maxItems": 2}),
    (dict, {"type": "object"}),
    (dict[str, float], {"type": "object", "additionalProperties": {"type": "number"}}),
    (Literal["a", "b"], {"type": "string", "enum": ["a", "b"]}),
    (Literal[1, "a"], {"enum": [1, "a"]}),
    (Unit, {"type": "string", "enum": ["celsius", "fahrenheit"]}),
    (Optional[int], {"type": ["integer", "null"]}),
    (int | None, {"type": ["integer", "null"]}),
    (Literal["a"] | None, {"type": ["string", "null"], "enum": ["a", None]}),
    (int | str, {"anyOf": [{"type": "integer"}, {"type": "string"}]}),
    (list[int] | None, {"type": ["array", "null"], "items": {"type": "integer"}}),
])
def test_schema_of_types(annotation, expected):
    assert prop(annotation) == expected


def test_unannotated_parameter_accepts_anything():
    def fn(x, y=3): ...
    assert params(fn)["properties"] == {"x": {}, "y": {"default": 3}}


def test_defaults_make_parameters_optional():
    def fn(city: str, days: int = 1, unit: Unit = Unit.CELSIUS, note: str | None = None): ...
    schema = params(fn)
    assert schema["required"] == ["city"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["days"] == {"type": "integer", "default": 1}
    assert schema["properties"]["unit"]["default"] == "celsius"
    assert schema["properties"]["note"] == {"type": ["string", "null"], "default": None}


def test_annotated_descriptions_and_chatglm3_required_flag():
    def get_weather(city_name: Annotated[str, "The name of the city to be queried", True],
                    days: Annotated[int, "Days ahead", True] = 1,
                    unit: Annotated[Unit, Field("Temperature unit")] = Unit.CELSIUS,
                    count: Annotated[int, "How many", {"minimum": 1, "maximum": 5}] = 1,
                    when: Annotated[str, "Date"] | None = None):
        """Get the current weather for `city_name`."""
    tool_ = function_tool(get_weather)
    assert tool_.description == "Get the current weather for `city_name`."
    props = tool_.parameters["properties"]
    assert props["city_name"] == {"type": "string", "description": "The name of the city to be queried"}
    assert props["unit"]["description"] == "Temperature unit"
    assert props["count"] == {"type": "integer", "minimum": 1, "maximum": 5, "description": "How many", "default": 1}
    assert props["when"]["type"] == ["string", "null"] and props["when"]["description"] == "Date"
    assert tool_.parameters["required"] == ["city_name", "days"]  # True makes a defaulted one required too


def test_not_required_without_default_is_refused():
    def fn(x: Annotated[str, "x", False]): ...
    with pytest.raises(ToolDefinitionError, match="'x' is marked not required but has no default"):
        function_tool(fn)


def test_google_docstring():
    def search(query: str, limit: int = 10, lang: Annotated[str, "from Annotated"] = "en"):
        """Search the web
        for pages.

        Longer text that is not part of the description.

        Args:
            query (str): What to look for,
                in words.
            limit: How many results.
            lang: from the docstring, overridden.

        Returns:
            The pages.
        """
    tool_ = function_tool(search)
    assert tool_.description == "Search the web for pages."
    props = tool_.parameters["properties"]
    assert props["query"]["description"] == "What to look for, in words."
    assert props["limit"]["description"] == "How many results."
    assert props["lang"]["description"] == "from Annotated"


def test_numpy_and_sphinx_docstrings():
    numpy_doc = """Add numbers.

    Parameters
    ----------
    x : int
        The first
        number.
    y : int, optional
        The second.

    Returns
    -------
    int
        The sum.
    """
    assert parse_docstring(numpy_doc) == ("Add numbers.", {"x": "The first number.", "y": "The second."})
    sphinx_doc = """Add numbers.

    :param x: The first
        number.
    :param int y: The second.
    :returns: The sum.
    """
    assert parse_docstring(sphinx_doc) == ("Add numbers.", {"x": "The first number.", "y": "The second."})
    assert parse_docstring(None) == ("", {})


def test_decorator_keeps_the_function_and_attaches_the_tool():
    @tool
    def add(a: int, b: int = 2) -> int:
        """Add two numbers."""
        return a + b

    @tool(name="math.multiply", description="Multiply.", timeout_s=3)
    def mul(a: int, b: int) -> int:
        return a * b

    assert add(1) == 3 and mul(2, 3) == 6
    assert isinstance(add.tool, Tool) and add.tool.name == "add" and add.tool.description == "Add two numbers."
    assert (mul.tool.name, mul.tool.description, mul.tool.timeout_s) == ("math.multiply", "Multiply.", 3)
    assert mul.tool.spec() == {"type": "function", "function": {
        "name": "math.multiply", "description": "Multiply.", "parameters": mul.tool.parameters}}


@pytest.mark.parametrize("name", ["get_weather", "a", "x" * 64, "mcp.server-1.tool_2", "A-9"])
def test_valid_names(name):
    assert tool(name=name)(lambda: 1).tool.name == name


@pytest.mark.parametrize("name", ["", "x" * 65, "has space", "天气", "a/b", "semi;colon", None])
def test_invalid_names(name):
    with pytest.raises(ToolDefinitionError, match="invalid: use 1 to 64 letters, digits"):
        tool(name=name)(lambda: 1)


def test_lambda_needs_a_name():
    with pytest.raises(ToolDefinitionError, match="'<lambda>' is invalid"):
        tool(lambda: 1)


def test_signatures_that_cannot_be_tools():
    def custom(x: object): ...
    with pytest.raises(ToolDefinitionError, match=r"custom, parameter 'x': unsupported type"):
        function_tool(custom)

    def positional(x, /): ...
    with pytest.raises(ToolDefinitionError, match="cannot be passed by name"):
        function_tool(positional)

    def star(*xs): ...
    with pytest.raises(ToolDefinitionError, match="cannot be passed by name"):
        function_tool(star)

    def unresolvable(x): ...
    unresolvable.__annotations__ = {"x": "NoSuchType"}
    with pytest.raises(ToolDefinitionError, match="cannot read its type hints"):
        function_tool(unresolvable)

    with pytest.raises(ToolDefinitionError, match="timeout_s"):
        function_tool(lambda: 1, name="t", timeout_s=0)


def test_var_keyword_allows_extra_arguments():
    @tool
    def anything(a: int, **rest):
        return {"a": a, **rest}
    assert anything.tool.parameters["additionalProperties"] is True
    assert json.loads(call_tool(anything.tool, '{"a": 1, "b": 2}').text) == {"a": 1, "b": 2}


# --- from_schema -----------------------------------------------------------------------------------------

SPEC = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_from_schema_full_and_inner_forms():
    for spec in (SPEC, SPEC["function"]):
        t = from_schema(spec, lambda city: f"sunny in {city}", timeout_s=5)
        assert (t.name, t.description, t.timeout_s) == ("get_weather", "Weather of a city.", 5)
        assert t.spec() == SPEC
        assert call_tool(t, {"city": "杭州"}) == Observation("sunny in 杭州")
        assert "missing required argument 'city'" in call_tool(t, {}).text


def test_from_schema_refuses_bad_definitions():
    with pytest.raises(ToolDefinitionError, match="not a valid JSON schema"):
        from_schema({"name": "t", "parameters": {"type": "objekt"}}, print)
    with pytest.raises(ToolDefinitionError, match="invalid"):
        from_schema({"name": "no spaces please"}, print)
    with pytest.raises(ToolDefinitionError, match="not callable"):
        from_schema({"name": "t"}, "print")
    assert from_schema({"name": "t"}, print).parameters == {"type": "object", "properties": {}}


# --- call_tool -------------------------------------------------------------------------------------------

@tool
def weather(city: str, days: int = 1, unit: Unit = Unit.CELSIUS, span: tuple[int, int] = (0, 1),
            options: dict[str, int] | None = None,
            where: Annotated[dict | None, {"properties": {"lat": {}, "lon": {}}, "required": ["lat", "lon"]}] = None,
            ) -> dict:
    """Weather of a city."""
    assert isinstance(unit, Unit) and isinstance(span, tuple) and isinstance(days, int)
    return {"city": city, "days": days, "unit": unit, "span": span}


def test_good_call_converts_to_declared_types():
    out = call_tool(weather.tool, '{"city": "北京", "days": 3.0, "unit": "fahrenheit", "span": [2, 5]}')
    assert out == Observation('{"city": "北京", "days": 3, "unit": "fahrenheit", "span": [2, 5]}')


@pytest.mark.parametrize("arguments, expected", [
    ({}, "missing required argument 'city'"),
    ({"city": "x", "dayz": 2}, "unexpected argument 'dayz'"),
    ({"city": 3}, "argument 'city' = 3 should be string"),
    ({"city": "x", "days": "three"}, "argument 'days' = \"three\" should be integer"),
    ({"city": "x", "days": 1.5}, "argument 'days' = 1.5 should be integer"),
    ({"city": "x", "unit": "kelvin"}, 'argument \'unit\' = "kelvin" should be one of "celsius", "fahrenheit"'),
    ({"city": "x", "span": [1]}, "argument 'span' = [1]"),
    ({"city": "x", "options": {"a": "b"}}, "argument 'options.a' = \"b\" should be integer"),
    ({"city": None}, "argument 'city' = null should be string"),
    ({"city": "x", "where": {"lat": 1}}, "argument 'where' lacks required key 'lon'"),
])
def test_bad_arguments_name_the_field(arguments, expected):
    out = call_tool(weather.tool, json.dumps(arguments))
    assert out.error
    assert out.text.startswith("invalid arguments for weather: ")
    assert expected in out.text
    assert 'It takes: city: string (required), days: integer, unit: "celsius"|"fahrenheit"' in out.text
    assert len(out.text) < 500


def test_several_problems_are_reported_together():
    out = call_tool(weather.tool, {"days": "x", "unit": "k", "foo": 1, "bar": 2})
    assert out.error and "missing required argument 'city'" in out.text and "(and 1 more)" in out.text


@pytest.mark.parametrize("arguments, expected", [
    ('{"city": ', "arguments are not valid JSON (Expecting value at line 1 column 10)"),
    ("city=北京", "arguments are not valid JSON"),
    ("[1, 2]", "arguments must be a JSON object of named arguments, not [1, 2]"),
    ('"just text"', "arguments must be a JSON object"),
    ("null", "arguments must be a JSON object"),
])
def test_unparsable_arguments(arguments, expected):
    out = call_tool(weather.tool, arguments)
    assert out.error and out.text.startswith("weather: ") and expected in out.text


def test_lenient_argument_forms():
    @tool
    def ping() -> str:
        return "pong"
    for arguments in (None, "", "  ", "{}", {}):
        assert call_tool(ping.tool, arguments) == Observation("pong")
    # a model that encoded the object twice
    assert call_tool(weather.tool, json.dumps(json.dumps({"city": "x"}))).text.startswith('{"city": "x"')


def test_exceptions_become_error_observations():
    @tool
    def boom(x: int) -> int:
        raise ZeroDivisionError(f"cannot divide {x} by zero")

    @tool
    def leave() -> None:
        sys.exit(3)

    out = call_tool(boom.tool, {"x": 4})
    assert out == Observation("boom failed: ZeroDivisionError: cannot divide 4 by zero", error=True)
    assert "Traceback" not in out.text
    assert call_tool(leave.tool) == Observation("leave failed: SystemExit: 3", error=True)
    assert call_tool(tool(name="bare")(lambda: exec("raise ValueError")).tool).text == "bare failed: ValueError"
    circular = []
    circular.append(circular)
    out = call_tool(tool(name="odd")(lambda: circular).tool)
    assert out == Observation("odd failed: ValueError: Circular reference detected", error=True)


def test_a_hanging_tool_times_out():
    release = threading.Event()

    @tool(timeout_s=0.2)
    def hang() -> str:
        release.wait(10)
        return "late"

    try:
        start = time.monotonic()
        out = call_tool(hang.tool)
        assert time.monotonic() - start < 2
        assert out.error and out.text.startswith("hang did not finish within 0.2 s and was abandoned")
    finally:
        release.set()


def test_results_as_text():
    cases = [("plain", "plain"), ({"温度": 25, "at": (1, 2)}, '{"温度": 25, "at": [1, 2]}'), (None, "null"),
             (3.5, "3.5"), ([Unit.CELSIUS, {1}], '["celsius", [1]]')]
    for value, text in cases:
        assert call_tool(tool(name="t")(lambda v=value: v).tool).text == text
    image = Image(b"\x89PNG", "plot")
    passed = call_tool(tool(name="t")(lambda: Observation("drawn", images=[image])).tool)
    assert passed == Observation("drawn", images=[image])


def test_huge_results_are_capped():
    text = "head" + "x" * 100_000 + "tail"
    out = call_tool(tool(name="big")(lambda: text).tool)
    assert not out.error
    assert MAX_OBSERVATION_CHARS <= len(out.text) < MAX_OBSERVATION_CHARS + 100
    assert out.text.startswith("head") and out.text.endswith("tail")
    assert f"[... {100_008 - MAX_OBSERVATION_CHARS:,} of 100,008 characters cut ...]" in out.text
    assert len(call_tool(tool(name="big")(lambda: text).tool, max_chars=100).text) < 200


def test_returned_observation_is_not_modified():
    shared = Observation("y" * 10_000)
    out = call_tool(tool(name="t")(lambda: shared).tool)
    assert len(shared.text) == 10_000 and len(out.text) < 10_000


def test_invalid_schema_is_an_error_observation_not_an_exception():
    broken = Tool("broken", "", {"type": "objekt"}, lambda: "x")
    out = call_tool(broken, {})
    assert out.error and "schema is invalid" in out.text


# --- Toolbox ---------------------------------------------------------------------------------------------

def test_toolbox():
    def plain(a: int) -> int:
        """A plain function."""
        return a

    box = Toolbox([weather, from_schema(SPEC, lambda city: city), plain])
    assert box.names() == ["weather", "get_weather", "plain"] and len(box) == 3 and "plain" in box
    assert [s["function"]["name"] for s in box.specs()] == box.names()
    assert box.get("plain").description == "A plain function." and box.get("nope") is None
    assert box.call("plain", '{"a": 5}') == Observation("5")
    assert box.call("plain", '{"a": "5"}').error
    with pytest.raises(ToolDefinitionError, match="two tools are named 'plain'"):
        box.add(plain)
    with pytest.raises(TypeError, match="not a tool"):
        box.add(42)


def test_unknown_tool_lists_the_available_ones():
    box = Toolbox([weather, from_schema(SPEC, lambda city: city)])
    out = box.call("get_wether", "{}")
    assert out.error
    assert out.text == ("there is no tool named 'get_wether'. Did you mean 'get_weather'? "
                        "Available tools: weather, get_weather")
    assert Toolbox().call("x").text == "there is no tool named 'x'. Available tools: (none)"


# --- load_tools_file ---------------------------------------------------------------------------------------

def test_load_tools_file(tmp_path):
    path = tmp_path / "my-tools.py"
    path.write_text(textwrap.dedent('''
        from __future__ import annotations
        from dataclasses import dataclass
        from typing import Annotated
        from glmkit.tools.registry import from_schema, tool

        @dataclass
        class Point:  # dataclasses need the module registered while it loads
            x: int

        def helper(x):
            return x

        @tool
        def greet(name: Annotated[str, "Who to greet"]) -> str:
            """Say hello."""
            return f"hello {helper(name)}"

        @tool(name="shout", timeout_s=2)
        def loud(text: str) -> str:
            return text.upper()

        echo = from_schema({"name": "echo", "parameters": {"type": "object"}}, lambda **kw: kw)
        also_greet = greet
    '''))
    tools = load_tools_file(path)
    assert [t.name for t in tools] == ["greet", "shout", "echo"]
    box = Toolbox(tools)
    assert box.call("greet", '{"name": "GLM"}') == Observation("hello GLM")
    assert box.call("shout", {"text": "hi"}).text == "HI"
    assert box.get("greet").parameters["properties"]["name"]["description"] == "Who to greet"


@pytest.mark.parametrize("source, expected", [
    ("import no_such_module_here\n", "ModuleNotFoundError: No module named 'no_such_module_here'"),
    ("raise RuntimeError('config missing')\n", "RuntimeError: config missing"),
    ("def broken(:\n", "SyntaxError"),
    ("import sys\nsys.exit(2)\n", "SystemExit: 2"),
    ("from glmkit.tools.registry import tool\n@tool\ndef f(x: object): ...\n", "ToolDefinitionError"),
])
def test_load_tools_file_that_fails(tmp_path, source, expected):
    path = tmp_path / "bad_tools.py"
    path.write_text(source)
    before = set(sys.modules)
    with pytest.raises(ToolDefinitionError) as info:
        load_tools_file(path)
    message = str(info.value)
    assert message.startswith(f"cannot load tools from {path}: ") and expected in message
    assert set(sys.modules) - before <= {"no_such_module_here"}  # the half-loaded module is not left behind


def test_load_tools_file_missing_or_empty(tmp_path):
    with pytest.raises(ToolDefinitionError, match="does not exist"):
        load_tools_file(tmp_path / "nope.py")
    (tmp_path / "tools.txt").write_text("")
    with pytest.raises(ToolDefinitionError, match="is not a Python file"):
        load_tools_file(tmp_path / "tools.txt")
    (tmp_path / "empty.py").write_text("def f(): pass\n")
    with pytest.raises(ToolDefinitionError, match="defines no tools: decorate functions with @tool"):
        load_tools_file(tmp_path / "empty.py")
