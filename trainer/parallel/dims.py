"""ParallelDims: the parallel degrees of a run, checked, and the device meshes built on them."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class ParallelDims:
    """Degrees of data (replicate, shard), tensor, pipeline and expert parallelism.

    dp_replicate * dp_shard * tp * pp must equal world_size. Expert parallelism borrows
    ranks from dp_shard * tp (as in torchtitan), so ep must divide that product and does
    not enter the world-size product. dp_shard = -1 takes every rank the others leave.
    """

    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    ep: int
    world_size: int
    _meshes: dict[str, DeviceMesh] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name in ("dp_replicate", "tp", "pp", "ep", "world_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel degree {name} must be >= 1, got {getattr(self, name)}")
        if self.dp_shard == -1:
            others = self.dp_replicate * self.tp * self.pp
            if self.world_size % others:
                raise ValueError(f"world size {self.world_size} is not divisible by "
                                 f"dp_replicate*tp*pp = {others}")
            self.dp_shard = self.world_size // others
        if self.dp_shard < 1:
            raise ValueError(f"dp_shard must be >= 1 or -1, got {self.dp_shard}")
        product = self.dp_replicate * self.dp_shard * self.tp * self.pp
        if product != self.world_size:
            raise ValueError(
                f"dp_replicate*dp_shard*tp*pp = {self.dp_replicate}*{self.dp_shard}*{self.tp}"
                f"*{self.pp} = {product}, but the world size is {self.world_size}")
        if (self.dp_shard * self.tp) % self.ep:
            raise ValueError(f"ep ({self.ep}) must divide dp_shard*tp "
                             f"({self.dp_shard * self.tp})")

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

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """The world mesh, dims (pp, dp_replicate, dp_shard, tp), degree-1 dims left out,
        plus the flattened "dp" mesh. Built once, on every rank."""
        if "world" in self._meshes:
            return self._meshes["world"]
        dims = [(n, d) for n, d in (("pp", self.pp), ("dp_replicate", self.dp_replicate),
                                     ("dp_shard", self.dp_shard), ("tp", self.tp)) if d > 1]
        if not dims:
            dims = [("dp_shard", 1)]
        names = tuple(n for n, _ in dims)
        mesh = init_device_mesh(device_type, tuple(d for _, d in dims), mesh_dim_names=names)
        dp_names = tuple(n for n in names if n in ("dp_replicate", "dp_shard"))
        if len(dp_names) > 1:
            mesh[dp_names]._flatten("dp")
        self._meshes["world"] = mesh
        return mesh

    def dp_mesh(self, device_type: str) -> DeviceMesh:
        """The data-parallel mesh: 1-D ("dp_replicate" or "dp_shard") or 2-D for HSDP."""
        mesh = self.build_mesh(device_type)
        names = tuple(n for n in ("dp_replicate", "dp_shard")
                      if n in (mesh.mesh_dim_names or ()))
        return mesh[names]

    def dp_rank(self, device_type: str) -> int:
        """This rank's position among the data-parallel ranks (0 when dp is off)."""
        if not self.dp_enabled:
            return 0
        mesh = self.build_mesh(device_type)
        names = mesh.mesh_dim_names or ()
        if "dp_replicate" in names and "dp_shard" in names:
            return mesh["dp"].get_local_rank()
        return mesh[("dp_replicate" if "dp_replicate" in names else "dp_shard")].get_local_rank()
