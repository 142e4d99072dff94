"""Where each tensor goes: which partition, at which aligned offset."""

from __future__ import annotations

from dataclasses import dataclass

from ember.ckpt_format.spec import align_up


@dataclass(frozen=True)
class Placement:
    partition: int
    offset: int


def plan_layout(
    sizes: dict[str, int], partitions: int, alignment: int
) -> tuple[dict[str, Placement], list[int]]:
    """Assign tensors (name -> nbytes) to partitions balanced by bytes, and lay each partition out.

    Largest tensor first onto the least-filled partition (the classic LPT greedy: within 4/3 of
    the best balance), ties broken by name so the layout is deterministic. Within a partition,
    tensors are laid out by name at aligned offsets. Returns placements and partition sizes
    (rounded up to `alignment`).
    """
    fill = [0] * partitions
    members: list[list[str]] = [[] for _ in range(partitions)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        p = min(range(partitions), key=lambda i: (fill[i], i))
        fill[p] += align_up(sizes[name], alignment)
        members[p].append(name)
    placements: dict[str, Placement] = {}
    part_sizes: list[int] = []
    for p, names in enumerate(members):
        cursor = 0
        for name in sorted(names):
            cursor = align_up(cursor, alignment)
            placements[name] = Placement(p, cursor)
            cursor += sizes[name]
        part_sizes.append(align_up(cursor, alignment))
    return placements, part_sizes
