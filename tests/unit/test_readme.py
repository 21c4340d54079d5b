"""The README's library example runs as written and does what its comments say."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"


def _library_example() -> str:
    text = README.read_text()
    section = text.split("## flora, the library", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_library_example_runs_and_round_trips(tmp_path, capsys):
    code = _library_example().replace("/tmp/demo-adapter", str(tmp_path / "demo"))
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), namespace)
    model, adapter = namespace["model"], namespace["adapter"]
    # conv (16, 3, 3, 3) with ranks (4, 3, 2, 2) and linear (4, 30) with ranks (4, 4)
    conv_params = 4 * 3 * 2 * 2 + 16 * 4 + 3 * 3 + 3 * 2 + 3 * 2
    linear_params = 4 * 4 + 4 * 4 + 30 * 4
    assert adapter.num_parameters == conv_params + linear_params
    assert capsys.readouterr().out.strip() == f"{conv_params + linear_params} ['0', '2']"
    # the saved adapter holds exactly the trained tensors
    for name, layer in namespace["flora"].adapter_layers(model):
        assert torch.equal(adapter.core(name), layer.core.detach())
