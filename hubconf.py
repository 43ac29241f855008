"""torch.hub entry points: ``torch.hub.load("path/to/veca-ssl", "veca_small", source="local")``.

One entry point per backbone preset (``torch.hub.list(repo, source="local")``), each
``name(pretrained=None, **kwargs)``:

* without ``pretrained``: a randomly initialised preset; ``kwargs`` go to ``build_backbone``
  (``patch_size=``, ``num_cores=``, ``depth=`` …);
* ``pretrained=PATH``: the weights of PATH through ``load_backbone`` — our exports, checkpoints and
  run directories, VECA reference checkpoints, DINOv2/DINOv3/timm files — checked to have the preset's
  architecture (family, width, depth, heads); ``kwargs`` then go to ``load_backbone``
  (e.g. ``which="student"``). Nothing is downloaded.

Backbones follow DINOv2's conventions: ``embed_dim``, ``num_features``, ``patch_size``,
``forward_features`` and ``get_intermediate_layers(x, n, reshape, return_class_token, norm)``, plus the
core width ``num_cores=`` of VECA models.
"""

dependencies = ["torch", "safetensors"]

from veca_ssl.models.hub import entrypoints as _entrypoints  # noqa: E402

globals().update(_entrypoints())
