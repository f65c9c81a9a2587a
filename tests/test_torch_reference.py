"""benchmarks/torch_reference.py, the PyTorch Spec+Att that flaxtag's speed is compared with, computes flaxtag's
function: its state_dict converts to flaxtag's weights (every tensor placed) and gives the same eval-mode
probabilities. Runs where torch is importable; flaxtag does not depend on it."""
import pytest

torch = pytest.importorskip("torch")

from benchmarks import torch_reference  # noqa: E402


@pytest.mark.parametrize("conv_channels,num_tags,parameters", [(16, 50, 6_882_452), (4, 7, None)])
def test_torch_model_equals_flaxtag_in_eval_mode(conv_channels, num_tags, parameters):
  torch.manual_seed(1)
  model = torch_reference.SpecAtt(conv_channels, num_tags)
  if parameters:  # SPEC §3's size, as flaxtag's (tests/test_models.py)
    assert sum(p.numel() for p in model.parameters()) == parameters
  assert torch_reference.check_against_flaxtag(model, conv_channels, num_tags) < 1e-5
