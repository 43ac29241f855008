"""torch.hub entry points, one per backbone preset, with DINOv2's and DINOv3's keywords::

    import torch
    repo_dir = "path/to/veca-ssl"  # a checkout; nothing is downloaded
    model = torch.hub.load(repo_dir, "veca_small", source="local", pretrained=False)   # random init
    model = torch.hub.load(repo_dir, "veca_tiny", source="local", depth=4, num_cores=16)
    # model = torch.hub.load(repo_dir, "veca_small", source="local", weights="veca_s.safetensors")

Each entry point ``name(*, pretrained=None, weights=None, **kwargs)`` returns the model in eval mode
(``.train()`` to train it):

* without weights (``pretrained`` unset or False): a randomly initialised preset; ``kwargs`` go to
  ``build_backbone`` (``patch_size=``, ``num_cores=``, ``depth=`` …), DINOv2's model keywords included
  (``init_values``, ``ffn_layer``, ``num_register_tokens``, ``img_size``, ``block_chunks`` …);
* ``weights=PATH`` (DINOv3's keyword; ``pretrained=PATH`` also works): the weights of PATH through
  ``load_backbone`` — our exports, checkpoints and run directories, VECA reference checkpoints,
  DINOv2/DINOv3/timm files — checked to have the preset's architecture; ``kwargs`` then go to
  ``load_backbone`` (e.g. ``which="student"``). ``pretrained=True`` without ``weights=`` is an error:
  no weights are bundled.

``torch.hub.list`` and ``torch.hub.help`` read GitHub repositories only (they take no ``source=``);
from a checkout, ``veca_ssl.models.list_backbones()`` lists the same names.

Backbones follow DINOv2's conventions: ``embed_dim``, ``num_features``, ``patch_size``,
``forward_features`` and ``get_intermediate_layers(x, n, reshape, return_class_token, norm)``, plus the
core width ``num_cores=`` of VECA models.
"""

dependencies = ["torch", "safetensors"]

from veca_ssl.models.hub import entrypoints as _entrypoints  # noqa: E402

globals().update(_entrypoints())
