"""How ComfyUI (0.33, execution.validate_inputs) checks one node's widget values in a queued prompt,
restated for the tests: the value is converted to the declared type (a failure is reported on
that input); inputs the node's VALIDATE_INPUTS does not take get ComfyUI's own min/max and combo
checks, each on its own input; then VALIDATE_INPUTS runs, and a message it returns is attached to
every input it takes. Returns [(input name, message)]: empty when ComfyUI would queue the node."""
from __future__ import annotations

import inspect


def validate_widgets(cls, values: dict) -> list:
    types = cls.INPUT_TYPES()
    declared = {**types.get("required", {}), **types.get("optional", {})}
    validate = getattr(cls, "VALIDATE_INPUTS", None)
    takes = inspect.getfullargspec(validate).args[1:] if validate is not None else []
    errors, converted = [], {}
    for name, val in values.items():
        kind, opts = declared[name][0], (declared[name][1] if len(declared[name]) > 1 else {})
        try:
            val = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}.get(kind, lambda v: v)(val) \
                if isinstance(kind, str) else val
        except Exception as exc:  # ComfyUI: "Failed to convert an input value to a INT value"
            errors.append((name, f"Failed to convert an input value to a {kind} value: {name}, {val}, {exc}"))
            continue
        converted[name] = val
        if name in takes:
            continue
        if "min" in opts and val < opts["min"]:
            errors.append((name, f"Value {val} smaller than min of {opts['min']}"))
        elif "max" in opts and val > opts["max"]:
            errors.append((name, f"Value {val} bigger than max of {opts['max']}"))
        elif isinstance(kind, list) and val not in kind:
            errors.append((name, f"Value not in list: {name}: {val!r}"))
    if takes:
        ret = validate(**{a: converted.get(a) for a in takes})
        if ret is not True:
            errors += [(a, f"{a} - {ret}") for a in takes if a in values]
    return errors
