"""The demo's two tools, as plain Python functions, their JSON-schema definitions (OpenAI's format) and the one place
that runs a call a model made: `run_tool_call(call) -> text`, the result or an error the model can read.

    calculator("12*(3+4)")            -> "84"       integers with + - * and parentheses, parsed with `ast`, never eval
    lookup("France", "capital")       -> "Paris"    the demo world's facts (model/demo_corpus.py), English or Chinese;
                                                    its populations are known only to this tool
"""
import ast
import functools
import json
import operator

MAX_EXPRESSION = 200  # characters: multiplying 200 digits is instant, and the answer still fits the context
FIELDS = ("capital", "continent", "population")
OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}

DEMO_TOOLS = [
    {"type": "function", "function": {
        "name": "calculator", "description": "Integer arithmetic with + - * and parentheses.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "lookup", "description": "A country's capital, continent or population.",
        "parameters": {"type": "object", "properties": {"country": {"type": "string"},
                                                        "field": {"type": "string", "enum": list(FIELDS)}},
                       "required": ["country", "field"]}}},
]


def calculator(expression: str) -> str:
    """The value of an integer expression with + - * and parentheses, e.g. '12*(3+4)' -> '84'."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError("expression must be a non-empty string")
    if len(expression) > MAX_EXPRESSION:
        raise ValueError(f"expression longer than {MAX_EXPRESSION} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"cannot parse {expression!r}") from e

    def value(node) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:  # not bool, float or str
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
            return OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            return -value(node.operand) if isinstance(node.op, ast.USub) else value(node.operand)
        raise ValueError(f"only integers, + - * and parentheses are allowed, not {ast.unparse(node)!r}")

    return str(value(tree.body))


@functools.cache
def _facts() -> dict:
    from .demo_corpus import load_countries

    from .demo_corpus import population

    facts = {}
    for c in load_countries():
        facts[c.name.casefold()] = (c.capital, c.continent, str(population(c)))
        facts[c.name_zh] = (c.capital_zh, c.continent_zh, str(population(c)))
    return facts


def lookup(country: str, field: str) -> str:
    """A demo-world fact: lookup('France', 'capital') -> 'Paris'; a Chinese name gives the Chinese answer."""
    if field not in FIELDS:
        raise ValueError(f"field must be one of {', '.join(FIELDS)}, not {field!r}")
    found = _facts().get(country.strip().casefold()) if isinstance(country, str) else None
    if found is None:
        raise ValueError(f"no country called {country!r} in the demo world")
    return found[FIELDS.index(field)]


DEMO_FUNCTIONS = {"calculator": calculator, "lookup": lookup}


def run_tool_call(call: dict, functions: dict = DEMO_FUNCTIONS) -> str:
    """Run an OpenAI-style call ({"function": {"name", "arguments": "<json>"}} or {"name", "arguments": {...}}):
    the result's text, or 'error: ...' text (an unknown tool, bad arguments, a failing tool) for the model to read."""
    call = call.get("function", call)
    function = functions.get(call.get("name"))
    if function is None:
        return f"error: no tool called {call.get('name')!r} (the tools are {', '.join(functions)})"
    arguments = call.get("arguments", {})
    try:
        arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
    except json.JSONDecodeError as e:
        return f"error: the arguments are not valid JSON ({e.msg})"
    if not isinstance(arguments, dict):
        return "error: the arguments must be a JSON object"
    try:
        return str(function(**arguments))
    except TypeError as e:  # missing or unexpected argument names
        return f"error: bad arguments for {call['name']}: {e}"
    except ValueError as e:
        return f"error: {e}"
