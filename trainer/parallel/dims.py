"""ParallelDims: the parallel degrees of a run, checked, and the device meshes built on them."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from trainer.config import resolve_degrees


@dataclass
class ParallelDims:
    """Degrees of data (replicate, shard), tensor, pipeline and expert parallelism.

    The rules between the degrees and the world size live in
    trainer.config.resolve_degrees (a bad combination raises its DegreeError, a
    ValueError): dp_replicate * dp_shard * tp * pp == world_size, and dp_shard = -1 takes
    every rank the others leave. Expert parallelism borrows its ranks from dp_shard
    (dp_shard = dp_shard_mod_ep * ep, as torchtitan does without tp), so ep must divide
    dp_shard and does not enter the world-size product: each group of ep data-parallel
    ranks splits the routed experts between them, and the dp_shard_mod_ep (x
    dp_replicate) ranks that hold the same experts shard and reduce them.
    """

    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    ep: int
    world_size: int
    _meshes: dict[str, DeviceMesh] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.dp_shard = resolve_degrees(self.dp_replicate, self.dp_shard, self.tp, self.pp,
                                        self.ep, self.world_size)

    @property
    def dp_degree(self) -> int:
        """Ranks that see different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_enabled(self) -> bool:
        return self.dp_degree > 1

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard > 1

    @property
    def ddp_enabled(self) -> bool:
        """Plain DDP: replicas only. With dp_shard > 1 too, FSDP runs as HSDP instead."""
        return self.dp_replicate > 1 and self.dp_shard == 1

    @property
    def dp_shard_mod_ep(self) -> int:
        """Ranks of dp_shard that hold the same experts."""
        return self.dp_shard // self.ep

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The world mesh, built once on every rank.

        Dims (pp, dp_replicate, dp_shard, tp), degree-1 dims left out; with ep > 1,
        dp_shard is split into (dp_shard_mod_ep, ep), both kept even when of degree 1,
        and flattened back into "dp_shard". With dp_replicate and dp_shard both present,
        they are also flattened into "dp"."""
        if "world" in self._meshes:
            return self._meshes["world"]
        shard = ([("dp_shard_mod_ep", self.dp_shard_mod_ep), ("ep", self.ep)] if self.ep > 1
                 else [("dp_shard", self.dp_shard)])
        dims = [(n, d) for n, d in [("pp", self.pp), ("dp_replicate", self.dp_replicate),
                                     *shard, ("tp", self.tp)]
                if d > 1 or n in ("dp_shard_mod_ep", "ep")]
        if not dims:
            dims = [("dp_shard", 1)]
        names = tuple(n for n, _ in dims)
        mesh = init_device_mesh(device_type, tuple(d for _, d in dims), mesh_dim_names=names)
        if self.ep > 1:
            self._meshes["dp_shard"] = mesh[("dp_shard_mod_ep", "ep")]._flatten("dp_shard")
        if self._has("dp_replicate") and self._has("dp_shard"):
            if self.ep > 1:
                flat = mesh[("dp_replicate", "dp_shard_mod_ep", "ep")]._flatten("dp")
            else:
                flat = mesh[("dp_replicate", "dp_shard")]._flatten("dp")
            self._meshes["dp"] = flat
        self._meshes["world"] = mesh
        return mesh

    def _has(self, name: str) -> bool:
        return {"pp": self.pp, "dp_replicate": self.dp_replicate, "tp": self.tp}.get(
            name, self.dp_shard) > 1 or (name == "dp_shard" and self.ep > 1)

    def dp_mesh(self, device_type: str) -> DeviceMesh:
        """The data-parallel mesh: 1-D ("dp_replicate" or "dp_shard") or 2-D for HSDP."""
        mesh = self.build_mesh(device_type)
        names = tuple(n for n in ("dp_replicate", "dp_shard") if self._has(n))
        if names == ("dp_shard",) and "dp_shard" in self._meshes:  # flattened (ep)
            return self._meshes["dp_shard"]
        return mesh[names or ("dp_shard",)]

    def expert_dp_mesh(self, device_type: str) -> DeviceMesh:
        """With ep > 1: the mesh over which routed experts are sharded by FSDP (the ranks
        that hold the same experts): ("dp_replicate", "dp_shard_mod_ep") or the latter."""
        mesh = self.build_mesh(device_type)
        names = (("dp_replicate",) if self.dp_replicate > 1 else ()) + ("dp_shard_mod_ep",)
        return mesh[names]

    def submesh(self, device_type: str, name: str) -> DeviceMesh:
        """The 1-D mesh of "tp", "ep" or "pp" (its degree must be > 1)."""
        return self.build_mesh(device_type)[name]

    def dp_rank(self, device_type: str) -> int:
        """This rank's position among the data-parallel ranks (0 when dp is off)."""
        if not self.dp_enabled:
            return 0
        self.build_mesh(device_type)
        if self._has("dp_replicate") and self._has("dp_shard"):
            return self._meshes["dp"].get_local_rank()
        return self.dp_mesh(device_type).get_local_rank()

    def pp_rank(self, device_type: str) -> int:
        """This rank's pipeline stage (0 when pp is off)."""
        return self.build_mesh(device_type)["pp"].get_local_rank() if self.pp > 1 else 0
