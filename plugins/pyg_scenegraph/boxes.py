r"""Box conventions used by scene-graph benchmarks.

Scene-graph code passes boxes around in three layouts; this module converts between them in one place:

* ``xyxy`` — corner coordinates :math:`(x_1, y_1, x_2, y_2)` in pixels (what :class:`SceneGraphData` stores);
* ``cxcywh`` — centre and size :math:`(c_x, c_y, w, h)` (what ``VG-SGG-with-attri.h5`` stores, at a longest
  image side of 512 or 1024);
* ``xywh`` — top-left corner and size (what raw Visual Genome and GQA JSON store).

:func:`box_code` is the 9-d box encoding of Neural Motifs / Scene-Graph-Benchmark that the energy model
embeds (`Suhail et al., CVPR 2021 <https://arxiv.org/abs/2103.02221>`_).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["box_code", "box_iou", "cxcywh_to_xyxy", "xywh_to_xyxy"]


def _check_boxes(boxes: Tensor, name: str) -> None:
    if not isinstance(boxes, Tensor):
        raise TypeError(f"'{name}' must be a torch.Tensor (got {type(boxes).__name__})")
    if boxes.dim() != 2 or boxes.size(-1) != 4:
        raise ValueError(f"'{name}' must have shape [num_boxes, 4] (got {list(boxes.shape)})")


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    r"""Convert centre-size boxes to corners: :math:`x_1 = c_x - w/2,\ x_2 = x_1 + w` (and likewise for y).

    This is the conversion Scene-Graph-Benchmark applies to ``boxes_1024`` of the VG150 h5 file.

    Args:
        boxes: ``[N, 4]`` boxes as :math:`(c_x, c_y, w, h)`.

    Returns:
        ``[N, 4]`` boxes as :math:`(x_1, y_1, x_2, y_2)`, same dtype.

    Raises:
        ValueError: if ``boxes`` is not ``[N, 4]``.
    """
    _check_boxes(boxes, "boxes")
    top_left = boxes[:, :2] - boxes[:, 2:] / 2
    return torch.cat([top_left, top_left + boxes[:, 2:]], dim=-1)


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    r"""Convert top-left/size boxes (Visual Genome, GQA JSON) to corners :math:`(x, y, x + w, y + h)`.

    Args:
        boxes: ``[N, 4]`` boxes as :math:`(x, y, w, h)`.

    Returns:
        ``[N, 4]`` boxes as :math:`(x_1, y_1, x_2, y_2)`.

    Raises:
        ValueError: if ``boxes`` is not ``[N, 4]``.
    """
    _check_boxes(boxes, "boxes")
    return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=-1)


def box_code(boxes: Tensor, image_size: Tensor) -> Tensor:
    r"""The 9-d box code of Neural Motifs / Scene-Graph-Benchmark (``encode_box_info``).

    .. math::
        w = x_2 - x_1 + 1,\quad h = y_2 - y_1 + 1,\quad
        \mathbf{b} = \Big(\tfrac{w}{W}, \tfrac{h}{H}, \tfrac{x_1 + w/2}{W}, \tfrac{y_1 + h/2}{H},
        \tfrac{x_1}{W}, \tfrac{y_1}{H}, \tfrac{x_2}{W}, \tfrac{y_2}{H}, \tfrac{wh}{WH}\Big)

    The :math:`+1` is the benchmark's pixel-inclusive convention and is kept so that codes match it.

    Args:
        boxes: ``[N, 4]`` boxes :math:`(x_1, y_1, x_2, y_2)` in pixels.
        image_size: ``[N, 2]`` per-box image size :math:`(W, H)` (e.g. ``data.image_size[data.batch]``),
            or ``[2]`` for a single image.

    Returns:
        ``[N, 9]`` box codes.

    Raises:
        ValueError: on wrong shapes or a non-positive image size.
    """
    _check_boxes(boxes, "boxes")
    if image_size.dim() == 1:
        image_size = image_size.unsqueeze(0).expand(boxes.size(0), 2)
    if image_size.shape != (boxes.size(0), 2):
        raise ValueError(
            f"'image_size' must have shape [2] or [{boxes.size(0)}, 2] (got {list(image_size.shape)})"
        )
    if not torch.compiler.is_compiling() and image_size.numel() > 0 and bool((image_size <= 0).any()):
        raise ValueError("'image_size' must be positive (width, height)")
    size = image_size.to(boxes.dtype)
    width, height = size[:, 0:1], size[:, 1:2]
    wh = boxes[:, 2:] - boxes[:, :2] + 1.0
    centre = boxes[:, :2] + 0.5 * wh
    scale = torch.cat([width, height], dim=-1)
    return torch.cat(
        [
            wh / scale,
            centre / scale,
            boxes[:, :2] / scale,
            boxes[:, 2:] / scale,
            (wh[:, 0:1] * wh[:, 1:2]) / (width * height),
        ],
        dim=-1,
    )


def box_iou(boxes1: Tensor, boxes2: Tensor, *, inclusive: bool = False) -> Tensor:
    r"""Pairwise intersection over union of corner boxes, :math:`|A \cap B| / |A \cup B|`.

    With ``inclusive=False`` (default) coordinates are continuous, :math:`|A| = (x_2 - x_1)(y_2 - y_1)`, as in
    ``torchvision.ops.box_iou``. With ``inclusive=True`` they are pixel indices and both corners belong to the
    box, :math:`|A| = (x_2 - x_1 + 1)(y_2 - y_1 + 1)` and likewise for the intersection — the convention of
    maskrcnn-benchmark's ``boxlist_iou`` that Scene-Graph-Benchmark's evaluation matches boxes with.

    Args:
        boxes1: ``[N, 4]`` boxes :math:`(x_1, y_1, x_2, y_2)`.
        boxes2: ``[M, 4]`` boxes.
        inclusive: Use the pixel-inclusive (+1) convention. (default: ``False``)

    Returns:
        ``[N, M]`` IoU matrix in the boxes' dtype (``0`` where the union is empty).

    Raises:
        TypeError: if either input is not a tensor.
        ValueError: if either input is not ``[*, 4]``.
    """
    _check_boxes(boxes1, "boxes1")
    _check_boxes(boxes2, "boxes2")
    one = 1.0 if inclusive else 0.0
    area1 = (boxes1[:, 2] - boxes1[:, 0] + one).clamp(min=0) * (boxes1[:, 3] - boxes1[:, 1] + one).clamp(
        min=0
    )
    area2 = (boxes2[:, 2] - boxes2[:, 0] + one).clamp(min=0) * (boxes2[:, 3] - boxes2[:, 1] + one).clamp(
        min=0
    )
    top_left = torch.max(boxes1[:, None, :2], boxes2[None, :, :2])
    bottom_right = torch.min(boxes1[:, None, 2:], boxes2[None, :, 2:])
    inter = (bottom_right - top_left + one).clamp(min=0).prod(dim=-1)
    union = area1[:, None] + area2[None, :] - inter
    return torch.where(
        union > 0, inter / union.clamp(min=torch.finfo(union.dtype).tiny), torch.zeros_like(inter)
    )
