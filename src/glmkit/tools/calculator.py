"""A safe arithmetic evaluator for the calculator tool.

The expression is parsed with `ast` and walked by hand: numbers, + - * / // % **, unary signs, parentheses, and a
whitelist of functions and constants. Nothing is ever given to eval or exec, and any other syntax (names, attribute
access, calls outside the whitelist, strings, lambdas, comprehensions) is refused before anything runs. Sizes are
bounded so that a hostile expression cannot eat the machine: the expression's length and nesting, integer results
(MAX_INT_BITS, checked before a power is computed), factorial's argument, round's digits.

Integers stay exact (2**100 is 1267650600228229401496703205376); `/` of two integers that divide evenly is an
integer, otherwise a float. Spellings models and Chinese input use are accepted: `^` is power (ChatGLM-style models
write 2^10; there is no XOR here), `×` `·` multiply, `÷` divides, `−` is minus, `π` is pi, superscript digits are
powers (3² is 3**2), and full-width digits, operators and parentheses (１２＋（３×４）) are read as ASCII. A trailing
`=` is ignored. Commas are not thousands separators (1,000 could be a list, a decimal comma or a thousand): they
only separate function arguments, and `1,000` is an error saying to write 1000.
"""

from __future__ import annotations

import ast
import math
import operator
import re
import unicodedata

MAX_EXPRESSION_CHARS = 1000
MAX_DEPTH = 100
MAX_INT_BITS = 10_000  # about 3,000 decimal digits
MAX_FACTORIAL = 1000
MAX_ROUND_DIGITS = 100

CONSTANTS = {"pi": math.pi, "e": math.e}
_SPELLINGS = str.maketrans({"^": "**", "×": "*", "✕": "*", "·": "*", "⋅": "*", "÷": "/", "−": "-", "π": "pi"})
_SUPERSCRIPTS = re.compile(r"[⁰¹²³⁴⁵⁶⁷⁸⁹]+")
_SUPERSCRIPT_DIGITS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
              ast.Mod: operator.mod}
_REFUSED = {ast.Attribute: "attribute access", ast.Subscript: "indexing", ast.Lambda: "a lambda",
            ast.ListComp: "a comprehension", ast.SetComp: "a comprehension", ast.DictComp: "a comprehension",
            ast.GeneratorExp: "a comprehension", ast.Compare: "a comparison", ast.BoolOp: "and/or",
            ast.NamedExpr: "assignment", ast.Starred: "unpacking"}


class CalculatorError(ValueError):
    """The expression is not one the calculator evaluates; the message says why."""


def evaluate(expression: str) -> int | float:
    """The value of an arithmetic expression; raises CalculatorError for anything else or anything too big."""
    if not isinstance(expression, str):
        raise CalculatorError(f"the expression must be text, not {type(expression).__name__}")
    text = normalize(expression)
    if not text:
        raise CalculatorError("the expression is empty")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise CalculatorError(f"the expression has {len(text):,} characters; the limit is {MAX_EXPRESSION_CHARS:,}")
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise CalculatorError(f"cannot read {text!r} as arithmetic: {e.msg} "
                              "(write products explicitly: 2*pi)") from None
    except (RecursionError, MemoryError):
        raise CalculatorError("the expression is nested too deeply") from None
    try:
        value = _eval(tree.body, 0)
    except CalculatorError:
        raise
    except ZeroDivisionError:
        raise CalculatorError("division by zero") from None
    except OverflowError:
        raise CalculatorError("the result is too large") from None
    except ValueError as e:  # math domain errors: sqrt(-1), log(0)
        raise CalculatorError(f"math error: {e}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise CalculatorError("the result is too large" if math.isinf(value) else "the result is not a number")
    return value


def format_number(value: int | float) -> str:
    """Integers in full; floats to 15 significant digits (0.1+0.2 shows as 0.3, 4.0 as 4)."""
    return str(value) if isinstance(value, int) else format(value, ".15g")


def normalize(expression: str) -> str:
    """The expression in ASCII Python arithmetic: superscripts as powers, full-width forms folded (NFKC), the
    spellings above replaced, a trailing '=' dropped."""
    text = _SUPERSCRIPTS.sub(lambda m: "**" + m[0].translate(_SUPERSCRIPT_DIGITS), expression)
    text = unicodedata.normalize("NFKC", text).translate(_SPELLINGS)
    return text.strip().removesuffix("=").strip()


def _eval(node: ast.AST, depth: int):
    if depth > MAX_DEPTH:
        raise CalculatorError(f"the expression is nested more than {MAX_DEPTH} levels deep")
    if isinstance(node, ast.Constant):
        if type(node.value) in (int, float):
            return node.value
        raise CalculatorError(f"only numbers are allowed, not {node.value!r}"[:120])
    if isinstance(node, ast.Name):
        if node.id in CONSTANTS:
            return CONSTANTS[node.id]
        raise CalculatorError(f"unknown name {node.id!r}; constants: pi, e; functions: {', '.join(_FUNCTIONS)}")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _eval(node.operand, depth + 1)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = _eval(node.left, depth + 1), _eval(node.right, depth + 1)
        if isinstance(node.op, ast.Pow):
            return _check(_power(left, right))
        if isinstance(node.op, ast.Div):
            exact = isinstance(left, int) and isinstance(right, int) and right != 0 and left % right == 0
            return left // right if exact else left / right
        if type(node.op) in _OPERATORS:
            return _check(_OPERATORS[type(node.op)](left, right))
        raise CalculatorError(f"the operator {type(node.op).__name__} is not allowed; use + - * / // % **")
    if isinstance(node, ast.Call):
        return _check(_call(node, depth))
    if isinstance(node, ast.Tuple):
        raise CalculatorError("commas only separate function arguments; write numbers without thousands "
                              "separators (1000000, not 1,000,000)")
    raise CalculatorError(f"{_REFUSED.get(type(node), type(node).__name__)} is not allowed in a calculation")


def _call(node: ast.Call, depth: int):
    if isinstance(node.func, ast.Constant):
        raise CalculatorError("write multiplication explicitly: 2*(3+4), not 2(3+4)")
    name = node.func.id if isinstance(node.func, ast.Name) else ast.unparse(node.func)[:60]
    if name not in _FUNCTIONS:
        raise CalculatorError(f"unknown function {name!r}; available: {', '.join(_FUNCTIONS)}")
    if node.keywords:
        raise CalculatorError(f"{name}() takes no keyword arguments")
    fn, counts = _FUNCTIONS[name]
    if len(node.args) not in counts:
        raise CalculatorError(f"{name}() takes {' or '.join(map(str, counts))} argument(s), got {len(node.args)}")
    return fn(*(_eval(arg, depth + 1) for arg in node.args))


def _check(value):
    if isinstance(value, complex):
        raise CalculatorError("the result is not a real number (a negative number to a fractional power?)")
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise CalculatorError(f"the result has more than {MAX_INT_BITS:,} bits (about 3,000 digits); refused")
    return value


def _power(base, exponent):
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0 and abs(base) > 1 \
            and exponent * (abs(base).bit_length() - 1) > MAX_INT_BITS:  # a lower bound of the result's bits
        raise CalculatorError(f"the result has more than {MAX_INT_BITS:,} bits (about 3,000 digits); refused")
    return base ** exponent


def _whole(x, what: str) -> int:
    if isinstance(x, float) and x.is_integer():
        return int(x)
    if not isinstance(x, int):
        raise CalculatorError(f"{what} must be a whole number, not {format_number(x)}")
    return x


def _sqrt(x):
    if isinstance(x, int) and x >= 0 and math.isqrt(x) ** 2 == x:
        return math.isqrt(x)
    return math.sqrt(x)


def _factorial(x):
    n = _whole(x, "factorial's argument")
    if not 0 <= n <= MAX_FACTORIAL:
        raise CalculatorError(f"factorial takes a whole number from 0 to {MAX_FACTORIAL}, not {n}")
    return math.factorial(n)


def _round(x, digits=None):
    if digits is None:
        return round(x)
    digits = _whole(digits, "round's digits")
    if abs(digits) > MAX_ROUND_DIGITS:
        raise CalculatorError(f"round's digits must be between -{MAX_ROUND_DIGITS} and {MAX_ROUND_DIGITS}")
    return round(x, digits)


_FUNCTIONS = {"sqrt": (_sqrt, (1,)), "sin": (math.sin, (1,)), "cos": (math.cos, (1,)), "tan": (math.tan, (1,)),
              "log": (math.log, (1, 2)), "log10": (math.log10, (1,)), "log2": (math.log2, (1,)),
              "exp": (math.exp, (1,)), "abs": (abs, (1,)), "round": (_round, (1, 2)), "floor": (math.floor, (1,)),
              "ceil": (math.ceil, (1,)), "factorial": (_factorial, (1,))}
