"""What every picture of the package and its benchmarks shares: point labels placed clear of every
other text, and the PNG written atomically."""

from __future__ import annotations

import os

from .files import atomic_write

# Where a point's label may go, in points from the point (x, y, horizontal and vertical alignment):
# beside it on either side, then above or below, then further up and down.
_SPOTS = [(5, 3, "left", "bottom"), (5, -3, "left", "top"), (-5, 3, "right", "bottom"), (-5, -3, "right", "top"),
          (0, 8, "center", "bottom"), (0, -8, "center", "top")]
_SPOTS += [(5, dy, "left", va) for k in range(1, 8) for dy, va in ((3 + 10 * k, "bottom"), (-3 - 10 * k, "top"))]
_PLACED = "point-label"  # the gid of the labels save_png places


def label_points(ax, points: list[tuple[float, float, str]], fontsize: float = 7) -> None:
    """Annotate each ``(x, y, text)`` of ``ax``; :func:`save_png` then moves each label to the first
    spot beside its point where it overlaps no other text of the figure and stays inside its axes."""
    for x, y, text in points:
        label = ax.annotate(text, (x, y), xytext=_SPOTS[0][:2], textcoords="offset points", ha=_SPOTS[0][2],
                            va=_SPOTS[0][3], fontsize=fontsize)
        label.set_in_layout(False)  # placed after the layout, inside its axes
        label.set_gid(_PLACED)


def _place_labels(fig) -> None:
    from matplotlib.text import Annotation, Text

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    movable = [t for t in fig.findobj(Annotation) if t.get_gid() == _PLACED]
    taken = [t.get_window_extent(renderer) for t in fig.findobj(Text)
             if t.get_visible() and t.get_text().strip() and not t.get_gid() == _PLACED]
    for label in movable:
        inside = label.axes.get_window_extent(renderer)
        for dx, dy, ha, va in _SPOTS:
            label.set_position((dx, dy))
            label.set_ha(ha)
            label.set_va(va)
            box = label.get_window_extent(renderer)
            fits = inside.x0 <= box.x0 and box.x1 <= inside.x1 and inside.y0 <= box.y0 and box.y1 <= inside.y1
            if fits and not any(box.overlaps(other) for other in taken):
                break
        taken.append(label.get_window_extent(renderer))


def save_png(fig, path: str | os.PathLike) -> None:
    """Place the figure's point labels (:func:`label_points`), write it as a PNG (100 dpi),
    atomically, and close it."""
    import io

    import matplotlib.pyplot as plt

    _place_labels(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write(path, buf.getvalue())
