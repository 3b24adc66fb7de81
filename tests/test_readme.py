"""The README's example runs as written and does what it says."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    result = namespace["result"]
    assert result.transform.shape == (8, 4, 4)
    assert namespace["target"].grad is not None and namespace["target"].grad.isfinite().all()
    layer = namespace["layer"]
    assert [n for n, _ in layer.named_parameters()] == ["log_temperatures.correspondence"]


def test_readme_quick_start_is_two_make_commands():
    text = README.read_text()
    quick = text[text.index("## Quick start"):text.index("## Example")]
    commands = re.findall(r"^make (\w+)", quick, flags=re.M)
    assert commands == ["book", "test"]
    makefile = (README.parent / "Makefile").read_text()
    assert re.search(r"^book:", makefile, flags=re.M) and re.search(r"^test:", makefile, flags=re.M)
    assert "make test" in (README.parent / ".ci" / "run").read_text()
