"""The README's figures are what the code prints today: its snippets and the demo's tables are rerun here."""
import contextlib
import io
import pathlib
import re

import pytest

README = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()


def blocks_after(heading: str) -> list[tuple[str, str]]:
    """The fenced code blocks (language, text) of the README section that starts at `heading`."""
    section = README.split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w*)\n(.*?)```", section, flags=re.S)


def test_core_snippet_prints_what_the_readme_shows():
    (lang, code), (_, shown) = blocks_after("## The core on its own")[:2]
    assert lang == "python"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    assert out.getvalue() == shown


@pytest.mark.slow
def test_demo_tables_are_what_main_prints(tmp_path):
    """`python main.py`'s comparison table and accuracy matrices, as the README's demo section shows them."""
    import importlib.util

    from kif_jax import metrics
    from kif_jax.train import train_and_evaluate

    spec = importlib.util.spec_from_file_location("demo", pathlib.Path(__file__).parent.parent / "configs" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    results = train_and_evaluate(demo.get_config(), tmp_path)
    printed = [metrics.accuracy_table(r["accuracy_matrix"], r["tasks"], method=r["method"]) for r in results.values()]
    printed.append(metrics.comparison_table(results))
    shown = [text.rstrip("\n") for _, text in blocks_after("## The demo")]
    assert shown == printed
