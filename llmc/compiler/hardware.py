"""Accelerator table: peak dense throughput, memory, interconnect and a reference price.

Everything here is data with a source. Conventions (read these before using a number):

* ``bf16_tflops`` / ``fp8_tflops`` / ``fp4_tflops`` are **dense** tensor-core peaks. NVIDIA datasheets print the
  2:4-structured-sparsity figure first (H100 SXM "1,979 TFLOPS BF16"); the dense figure is half of it
  (989.4). Using the sparse figure halves every predicted training time.
* ``fp32_tflops`` is the plain (non-tensor-core) FP32 peak: PyTorch does not use TF32 for matmuls by
  default (``torch.backends.cuda.matmul.allow_tf32 = False`` since 1.12), so "fp32" training runs at this
  rate. ``tf32_tflops`` (dense) is given where it exists.
* ``hbm_bytes`` is the device memory **as the device reports it**: the total a process sees,
  ``torch.cuda.get_device_properties(0).total_memory`` (= ``torch.cuda.mem_get_info()[1]``, CUDA's
  ``cudaDeviceProp.totalGlobalMem``; the "GPU 0 has a total capacity of X GiB" of PyTorch's out-of-memory message),
  e.g. 79.11 GiB on an H100 SXM5 "80GB". That is what the caching allocator can reach and what vLLM sizes its KV
  cache from (``gpu_memory_utilization`` x total). Each row's ``hbm_source`` cites a public report of it; where the
  reports differ (driver versions reserve a little more or less) the row keeps the **lowest**. nvidia-smi's
  "MiB total" is larger (H100: 81,559 MiB = 79.65 GiB: the driver keeps ~0.5 GiB of it); a row that only has an
  nvidia-smi / rocm-smi figure says so. The plan charges what runs outside the allocator (CUDA context, NCCL
  buffers: :mod:`llmc.compiler.backends`) against this total, so it is not reduced here (a decimal-GB capacity
  would count that margin twice: 80e9 B = 74.5 GiB on an H100). A row with no public device figure keeps the
  marketed decimal figure (``hbm_source`` empty, the notes say so): conservative, 5-7 % below the device's.
  ``hbm_marketed_gb`` is the datasheet figure ("80 GB"), for display only.
* ``hbm_gbps`` is memory bandwidth in GB/s (1e9 B/s).
* ``nvlink_gbps`` is scale-up bandwidth **per GPU per direction** in GB/s. Datasheets quote the
  bidirectional total (H100 "900 GB/s" = 18 links x 50 GB/s bidirectional), so the value here is half.
  0 = no GPU-to-GPU fabric (PCIe only).
* ``pcie_gbps`` is the host link per GPU **per direction** in GB/s (PCIe Gen4 x16: 32 GB/s, Gen5 x16:
  64 GB/s, i.e. half the bidirectional figure datasheets print). Parts without NVLink move intra-node
  collectives over it (through the PCIe switch / host); 0 = not given in the table.
* ``net_gbps`` is the scale-out NIC per GPU in **Gbit/s** (HGX/DGX H100: one 400 Gb/s ConnectX-7 per GPU).
* ``usd_per_hour`` is a rough on-demand reference price per GPU-hour (volatile; users override it in
  ``hardware.usd_per_gpu_hour``).
* ``storage_write_gbps`` is the sustained checkpoint write bandwidth **per node** in GB/s, to the storage the run
  checkpoints to (``llmc.compiler.checkpoint_cost``; ``training.checkpoint.write_gbps`` overrides it). No datasheet
  gives it: it is the cluster's filesystem, not the part. Every row keeps the conservative default
  :data:`STORAGE_WRITE_GBPS` = 1 GB/s per node: Meta's Llama 3 cluster storage (Tectonic) "supports a sustainable
  throughput of 2 TB/s and a peak throughput of 7 TB/s" for 16K H100 GPUs, i.e. 2,048 eight-GPU nodes (Dubey et al.
  2024, arXiv:2407.21783 sec. 3.3.1): ~1 GB/s per node sustained when every node saves at once. One node writing to
  its own NVMe RAID, or a parallel filesystem client with a dedicated storage NIC (DGX H100: 2 x 200 Gb/s), reaches
  several times that: set it for the cluster you run on.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmc.compiler.units import GiB

TERA = 1e12
GB = 10**9
# sustained checkpoint write bandwidth per node, GB/s (conservative default: see ``storage_write_gbps`` above)
STORAGE_WRITE_GBPS = 1.0


@dataclass(frozen=True)
class GPU:
    key: str
    name: str
    bf16_tflops: float  # dense (not the 2:4 sparsity figure)
    fp8_tflops: float | None  # dense; None = no FP8 tensor cores
    fp32_tflops: float  # non-tensor-core FP32
    hbm_bytes: int  # device-reported total (torch total_memory); see the module docstring
    hbm_gbps: float  # GB/s
    nvlink_gbps: float  # GB/s per GPU per direction; 0 = none
    net_gbps: float  # Gbit/s per GPU (scale-out NIC)
    gpus_per_node: int
    usd_per_hour: float  # reference on-demand price per GPU-hour
    source: str  # datasheet URL
    tf32_tflops: float | None = None  # dense TF32 tensor core, where it exists
    notes: str = ""
    power_w: float | None = None  # board power limit the part runs at, in W
    tdp_w: float | None = None  # rated board power of the part the peaks are quoted at (None = power_w)
    nvlink_domain: int | None = None  # GPUs sharing one NVLink fabric (None = gpus_per_node; GB200 NVL72: 72)
    # how the node's GPU fabric joins its GPUs (:func:`llmc.compiler.timing.intra_group_gbps`): "switch" (NVSwitch:
    # every GPU at nvlink_gbps to any other), "pairs" (an NVLink bridge joins pairs of cards, PCIe between pairs:
    # H100 PCIe / NVL), "mesh" (a fully connected mesh of gpus_per_node - 1 links, nvlink_gbps shared among them:
    # MI300X / MI325X Infinity Fabric, 64 GB/s per direction to each peer)
    nvlink_topology: str = "switch"
    pcie_gbps: float = 0.0  # GB/s per GPU per direction over PCIe; 0 = not given
    mx_block_scaling: bool = False  # tensor cores run OCP MX block-scaled formats (MXFP8: Blackwell, SM 10.x)
    # dense FP4 (NVFP4: E2M1 with an E4M3 scale per 16 elements) tensor peak; None = no FP4 tensor cores (before
    # Blackwell): what ``training.precision: nvfp4`` runs its converted linears at
    fp4_tflops: float | None = None
    host_gib: float = 0.0  # host (CPU) memory of the reference node in GiB, for offload plans; 0 = not given
    vendor: str = "nvidia"  # "nvidia" | "amd": the Kubernetes device-plugin resource (nvidia.com/gpu, amd.com/gpu)
    # SkyPilot accelerator name for a multi-node build's skypilot/task.yaml; None = none known (the task is then
    # not written). Names as SkyPilot's catalogs and canonical list spell them: ``sky show-gpus -a``,
    # https://docs.skypilot.co/en/latest/compute/gpus.html and sky/utils/gpu_names.py (GB300, GB200, B300, ...)
    # in https://github.com/skypilot-org/skypilot; H100-NVL and RTX4090 are RunPod catalog names.
    skypilot_name: str | None = None
    storage_write_gbps: float = STORAGE_WRITE_GBPS  # GB/s per node to the checkpoint storage (conservative default)
    hbm_marketed_gb: float = 0.0  # the datasheet's capacity in decimal GB ("80 GB"), for display; 0 = not given
    # public report(s) of the device-reported total ``hbm_bytes`` is (URL and what it shows); "" = none found, and
    # ``hbm_bytes`` is then the marketed decimal figure
    hbm_source: str = ""

    @property
    def hbm_gib(self) -> float:
        return self.hbm_bytes / GiB


# ----------------------------------------------------------------------------------------------- table
# One row per accelerator. Sources are the vendor datasheets / whitepapers; the comment on each row
# says which figure was halved (sparse -> dense) or divided (bidirectional -> per direction).
_ROWS: list[dict] = [
    dict(
        key="h100-sxm",
        skypilot_name="H100",
        power_w=700,
        name="NVIDIA H100 SXM5 80GB",
        # datasheet: BF16 1,979 TF / FP8 3,958 TF "with sparsity" -> dense 989.4 / 1,978.9 (H100 whitepaper
        # table 3, SXM5 at boost clock); FP32 67 TF; TF32 989 sparse -> 494.7 dense; 80 GB HBM3 3.35 TB/s;
        # NVLink4 900 GB/s bidirectional; HGX H100: 8 x ConnectX-7 400 Gb/s.
        bf16_tflops=989.4,
        fp8_tflops=1978.9,
        fp32_tflops=66.9,
        tf32_tflops=494.7,
        hbm_bytes=int(79.11 * GiB),
        hbm_marketed_gb=80,
        hbm_source=(
            "https://github.com/vllm-project/vllm/issues/27508 (NVIDIA H100 80GB HBM3, driver 535.247.01: "
            "PyTorch 'GPU 0 has a total capacity of 79.11 GiB'; nvidia-smi '0MiB / 81559MiB'); other drivers "
            "report up to 79.21 GiB: the lowest kept"
        ),
        hbm_gbps=3350,
        nvlink_gbps=450,
        net_gbps=400,
        gpus_per_node=8,
        usd_per_hour=2.5,
        # host: 2 TB (32 x 64 GB DIMMs) in 8x H100 SXM systems' MLPerf descriptions (e.g. HPE Cray XD670, MLPerf
        # Inference v5.0: host_memory_capacity 2048GB); vendors ship 1-2 TB: set hardware.host_memory_gib
        host_gib=2048,
        source="https://www.nvidia.com/en-us/data-center/h100/ ; https://resources.nvidia.com/en-us-tensor-core/gtc22-whitepaper-hopper ; https://github.com/mlcommons/inference_results_v4.1/blob/main/open/HPE/results/HPE_Cray_XD670_H100_SXM_80GBx8_TRT/README.md",
    ),
    dict(
        key="h100-pcie",
        skypilot_name="H100",
        power_w=350,
        name="NVIDIA H100 PCIe 80GB",
        # datasheet: BF16 1,513 TF sparse -> 756.5 dense; FP8 3,026 sparse -> 1,513 dense; FP32 51 TF;
        # 80 GB HBM2e 2.0 TB/s; NVLink bridge 600 GB/s bidirectional (pairs only) -> 300 per direction.
        bf16_tflops=756.5,
        fp8_tflops=1513.0,
        fp32_tflops=51.2,
        tf32_tflops=378.0,
        hbm_bytes=80 * GB,
        hbm_marketed_gb=80,
        hbm_gbps=2000,
        nvlink_gbps=300,
        pcie_gbps=64,  # datasheet: PCIe Gen5 128 GB/s (bidirectional)
        net_gbps=200,
        gpus_per_node=8,
        usd_per_hour=2.0,
        source="https://www.nvidia.com/en-us/data-center/h100/",
        notes=("NVLink bridge connects pairs of cards only; an 8-GPU PCIe server is PCIe-switched otherwise; "
               "capacity: the marketed decimal GB (no public device-reported total found)"),
        nvlink_topology="pairs",
    ),
    dict(
        key="h800",
        skypilot_name="H800",
        power_w=700,
        name="NVIDIA H800 SXM5 80GB",
        # Export variant of H100 SXM: same tensor cores and HBM3, NVLink cut to 400 GB/s bidirectional
        # (-> 200 per direction). DeepSeek-V3 report (arXiv 2412.19437 sec. 3.1): 8 GPUs/node over
        # NVLink/NVSwitch, InfiniBand across nodes; $2/GPU-hour rental assumption (sec. 1).
        bf16_tflops=989.4,
        fp8_tflops=1978.9,
        fp32_tflops=66.9,
        tf32_tflops=494.7,
        hbm_bytes=80 * GB,
        notes="capacity: the marketed decimal GB (no public device-reported total found)",
        hbm_marketed_gb=80,
        hbm_gbps=3350,
        nvlink_gbps=200,
        net_gbps=400,
        gpus_per_node=8,
        usd_per_hour=2.0,
        source="https://arxiv.org/abs/2412.19437 ; https://www.nvidia.com/en-us/data-center/h800/",
    ),
    dict(
        key="h200",
        skypilot_name="H200",
        power_w=700,
        name="NVIDIA H200 SXM 141GB",
        # datasheet: same compute as H100 SXM (BF16 1,979 sparse / FP8 3,958 sparse); 141 GB HBM3e 4.8 TB/s;
        # NVLink 900 GB/s bidirectional.
        bf16_tflops=989.4,
        fp8_tflops=1978.9,
        fp32_tflops=66.9,
        tf32_tflops=494.7,
        hbm_bytes=int(139.80 * GiB),
        hbm_marketed_gb=141,
        hbm_source=(
            "https://github.com/sungwon-chae/arxiv_confi/blob/HEAD/etu_logging.md (8 x NVIDIA H200: PyTorch "
            "'GPU 0 has a total capacity of 139.81 GiB'); 139.80 GiB in other public 8 x H200 training logs: "
            "the lower kept"
        ),
        hbm_gbps=4800,
        nvlink_gbps=450,
        net_gbps=400,
        gpus_per_node=8,
        usd_per_hour=3.5,
        # host: 2 TB (32 x 64 GB DIMMs) in NVIDIA's own 8x H200 SXM MLPerf system (Inference v4.1, closed,
        # H200-SXM-141GBx8); other vendors ship 1.5-2 TB: set hardware.host_memory_gib
        host_gib=2048,
        source="https://www.nvidia.com/en-us/data-center/h200/ ; https://github.com/mlcommons/inference_results_v4.1/blob/main/closed/NVIDIA/systems/H200-SXM-141GBx8_TRT_MaxQ.json",
    ),
    dict(
        key="b200",
        skypilot_name="B200",
        power_w=1000,
        name="NVIDIA B200 180GB (HGX)",
        # HGX B200 spec table (per GPU): FP16/BF16 tensor 4.5 PF sparse -> 2.25 PF dense; FP8 9 PF sparse
        # -> 4.5 PF dense; TF32 2.2 PF sparse -> 1.1 dense; FP32 75 TF; 180 GB HBM3e at 7.7 TB/s (the
        # "8 TB/s" / "192 GB" figures are the B200 chip maximum); NVLink5 1.8 TB/s bidirectional per GPU;
        # 8 x 400 Gb/s ConnectX-7 per DGX B200.
        bf16_tflops=2250.0,
        fp8_tflops=4500.0,
        fp32_tflops=75.0,
        tf32_tflops=1100.0,
        hbm_bytes=int(178.35 * GiB),
        hbm_marketed_gb=180,
        hbm_source=(
            "https://github.com/pytorch/ao/pull/4002 (NVIDIA B200, cudaDeviceProp totalGlobalMem: 'Total "
            "Global Memory: 178.35 GB', in GiB); https://github.com/unslothai/unsloth/issues/3411 (NVIDIA "
            "B200, torch: 'Total VRAM: 178.35 GB' = total_memory / 2^30); nvidia-smi '183359MiB': "
            "https://github.com/NVIDIA/TensorRT-LLM/issues/10278"
        ),
        hbm_gbps=7700,
        nvlink_gbps=900,
        net_gbps=400,
        gpus_per_node=8,
        usd_per_hour=5.0,
        source="https://www.nvidia.com/en-us/data-center/hgx/",
        notes="B200 chip: 192 GB / 8 TB/s; HGX/DGX B200 expose 180 GB at 7.7 TB/s per GPU",
        # Blackwell tensor cores run MXFP8 (Transformer Engine docs, MXFP8: "Supported devices: SM 10.0, SM 10.3";
        # torchtitan 0.3.0 components/quantization/mx.py: MXFP8 "only supported on SM100 or later")
        mx_block_scaling=True,
        # HGX B200 spec table (8 GPUs): FP4 tensor core 144 PF sparse -> 18 PF sparse per GPU, halved -> 9 PF
        # dense (https://www.nvidia.com/en-us/data-center/hgx/); torchao's roofline table has the same 9.0e15
        # (torchao/testing/training/roofline_utils.py, "NVIDIA B200" fp4_peak_tops)
        fp4_tflops=9000.0,
    ),
    dict(
        key="h100-nvl",
        skypilot_name="H100-NVL",
        name="NVIDIA H100 NVL 94GB",
        # H100 NVL datasheet: BF16 1,671 TF sparse -> 835.5 dense; FP8 3,341 sparse -> 1,670.5 dense;
        # FP32 60 TF; TF32 835 sparse -> 417.5 dense; 94 GB HBM3 3.9 TB/s; NVLink bridge 600 GB/s
        # bidirectional (pairs) -> 300 per direction; 350-400 W configurable.
        bf16_tflops=835.5,
        fp8_tflops=1670.5,
        fp32_tflops=60.0,
        tf32_tflops=417.5,
        hbm_bytes=int(93.00 * GiB),
        hbm_marketed_gb=94,
        hbm_source=(
            "https://github.com/ali-vilab/VACE/issues/56 (H100 NVL 94GB: PyTorch 'GPU 0 has a total capacity "
            "of 93.00 GiB')"
        ),
        hbm_gbps=3900,
        nvlink_gbps=300,
        pcie_gbps=64,  # datasheet: PCIe Gen5 128 GB/s (bidirectional)
        net_gbps=400,
        gpus_per_node=8,
        usd_per_hour=2.5,
        power_w=400,
        source="https://www.nvidia.com/en-us/data-center/h100/",
        notes="NVLink bridge connects pairs of cards; PCIe Gen5 otherwise",
        nvlink_topology="pairs",
    ),
    dict(
        key="h100-hbm2e-96g",
        name="NVIDIA H100 96GB HBM2e (500 W, Grand Teton)",
        # The part of torchtitan's H100 benchmarks: "8 H100 per host fully connected with NVLink, 96GB HBM2e
        # per GPU at 2.4 TB/s, 400 Gb/s RDMA per GPU, default 500W power limit". Tensor-core peaks are the
        # H100 SXM5 figures (same GH100 configuration); the 500 W cap lowers sustained clocks, which the
        # peak does not show: see clock_factor (tdp_w = the 700 W the SXM5 peaks are quoted at).
        bf16_tflops=989.4,
        fp8_tflops=1978.9,
        fp32_tflops=66.9,
        tf32_tflops=494.7,
        hbm_bytes=96 * GB,
        notes="capacity: the marketed decimal GB (no public device-reported total found)",
        hbm_marketed_gb=96,
        hbm_gbps=2400,
        nvlink_gbps=450,
        net_gbps=400,
        gpus_per_node=8,
        usd_per_hour=2.5,
        power_w=500,
        tdp_w=700,
        source="https://github.com/pytorch/torchtitan/blob/820504e20d1149fbf0b98c567af24c4b0433b22d/benchmarks/llama3_h100_202412_torchtitan.md",
    ),
    dict(
        key="h20",
        name="NVIDIA H20 96GB",
        # China-market Hopper: BF16 148 TF dense, FP8 296 TF dense, FP32 44 TF, 96 GB HBM3 at 4.0 TB/s,
        # NVLink 900 GB/s bidirectional -> 450 per direction, 400 W (NVIDIA H20 product brief figures).
        bf16_tflops=148.0,
        fp8_tflops=296.0,
        fp32_tflops=44.0,
        tf32_tflops=74.0,
        hbm_bytes=int(95.00 * GiB),
        hbm_marketed_gb=96,
        hbm_source=(
            "https://github.com/modelscope/DiffSynth-Studio/issues/1238 (H20 96G: PyTorch 'has a total "
            "capacity of 95.00 GiB'); nvidia-smi '97871MiB': https://github.com/NVIDIA/nvtrust/issues/128"
        ),
        hbm_gbps=4000,
        nvlink_gbps=450,
        net_gbps=400,
        gpus_per_node=8,
        usd_per_hour=1.5,
        power_w=400,
        source="https://www.nvidia.com/en-us/data-center/h100/ (Hopper family); H20 product brief",
        notes="export part: about 15 % of H100's tensor throughput with more HBM bandwidth",
    ),
    dict(
        key="gb200",
        skypilot_name="GB200",
        name="NVIDIA GB200 NVL72 (per Blackwell GPU)",
        # GB200 NVL72 spec table (72 GPUs): FP16/BF16 360 PF sparse -> 2.5 PF dense per GPU; FP8 720 PF
        # sparse -> 5 PF dense per GPU; TF32 180 PF sparse -> 1.25 PF dense per GPU; FP32 5,760 TF -> 80 TF
        # per GPU; up to 186 GB HBM3e at 8 TB/s per GPU; NVLink5 1.8 TB/s bidirectional per GPU -> 900 per
        # direction, all 72 GPUs in one NVLink domain; compute trays of 2 Grace + 4 Blackwell GPUs.
        bf16_tflops=2500.0,
        fp8_tflops=5000.0,
        fp32_tflops=80.0,
        tf32_tflops=1250.0,
        hbm_bytes=186 * GB,
        notes="capacity: the marketed decimal GB (no public device-reported total found)",
        hbm_marketed_gb=186,
        hbm_gbps=8000,
        nvlink_gbps=900,
        net_gbps=400,
        gpus_per_node=4,
        nvlink_domain=72,
        usd_per_hour=6.0,
        power_w=1200,
        source="https://www.nvidia.com/en-us/data-center/gb200-nvl72/",
        mx_block_scaling=True,  # Blackwell (as b200)
        # GB200 NVL72 spec table: FP4 tensor core 1,440 PF sparse / 72 GPUs = 20 PF sparse per GPU, halved -> 10 PF
        # dense (https://www.nvidia.com/en-us/data-center/gb200-nvl72/)
        fp4_tflops=10000.0,
    ),
    dict(
        key="b300",
        skypilot_name="B300",
        name="NVIDIA B300 288GB (HGX, Blackwell Ultra)",
        # HGX B300 spec table (8 GPUs): FP8/FP6 72 PF sparse -> 4.5 PF dense per GPU; FP16/BF16 36 PF sparse ->
        # 2.25 PF dense; TF32 18 PF sparse -> 1.125 PF dense; FP32 600 TF -> 75 TF; up to 2.3 TB HBM3e -> 288 GB
        # per GPU at up to 8 TB/s; NVLink5 1.8 TB/s bidirectional per GPU; ConnectX-8 800 Gb/s per GPU.
        # Blackwell Ultra keeps B200's FP8 / BF16 dense rates; it doubles the softmax exponent unit (SFU) rate,
        # which speeds up attention (not modelled: llmc's attention runs at the GEMM efficiency of its backend).
        bf16_tflops=2250.0,
        fp8_tflops=4500.0,
        fp32_tflops=75.0,
        tf32_tflops=1125.0,
        hbm_bytes=288 * GB,
        hbm_marketed_gb=288,
        hbm_gbps=8000,
        nvlink_gbps=900,
        net_gbps=800,
        gpus_per_node=8,
        usd_per_hour=6.0,
        power_w=1100,
        source="https://www.nvidia.com/en-us/data-center/hgx/ (HGX B300); https://www.nvidia.com/en-us/data-center/dgx-b300/",
        notes=("Blackwell Ultra: B200's dense FP8/BF16 rates, 288 GB, 2x the attention exponent rate; "
               "capacity: the marketed decimal GB (no public device-reported total found)"),
        mx_block_scaling=True,  # Blackwell (SM 10.x), as b200
        # HGX B300 spec table (8 GPUs): FP4 tensor core 144 PF sparse | 105 PF dense -> 13.125 PF dense per GPU, the
        # dense figure as printed, not halved (https://www.nvidia.com/en-us/data-center/hgx/,
        # https://www.nvidia.com/en-us/data-center/dgx-b300/). Blackwell Ultra chip pages quote 14-15 PF per GPU
        # (torchao's roofline table: 14e15); the HGX system figure is the one for the 8-GPU board this entry is
        fp4_tflops=13125.0,
    ),
    dict(
        key="gb300",
        skypilot_name="GB300",
        name="NVIDIA GB300 NVL72 (per Blackwell Ultra GPU)",
        # GB300 NVL72 spec table (72 GPUs): FP8/FP6 720 PF sparse -> 5 PF dense per GPU; FP16/BF16 360 PF sparse
        # -> 2.5 PF dense; TF32 180 PF sparse -> 1.25 PF dense; FP32 6 PF -> 83 TF; up to 20 TB HBM3e at up to
        # 576 TB/s -> 279 GB at 8 TB/s per GPU; NVLink 130 TB/s -> 1.8 TB/s bidirectional per GPU, all 72 GPUs in
        # one NVLink domain; compute trays of 2 Grace + 4 Blackwell Ultra GPUs; 72 ConnectX-8 (800 Gb/s) NICs.
        bf16_tflops=2500.0,
        fp8_tflops=5000.0,
        fp32_tflops=83.0,
        tf32_tflops=1250.0,
        hbm_bytes=279 * GB,
        hbm_marketed_gb=279,
        hbm_gbps=8000,
        nvlink_gbps=900,
        net_gbps=800,
        gpus_per_node=4,
        nvlink_domain=72,
        usd_per_hour=7.0,
        power_w=1400,
        source="https://www.nvidia.com/en-us/data-center/gb300-nvl72/",
        notes=("Blackwell Ultra: GB200's dense FP8/BF16 rates, 279 GB, 2x the attention exponent rate; "
               "capacity: the marketed decimal GB (no public device-reported total found)"),
        mx_block_scaling=True,  # Blackwell (SM 10.x), as b200
        # GB300 NVL72 spec table: FP4 tensor core 1,440 PF sparse | 1,080 PF dense -> 1,080 / 72 = 15 PF dense per
        # GPU, the dense figure as printed, not halved (https://www.nvidia.com/en-us/data-center/gb300-nvl72/)
        fp4_tflops=15000.0,
    ),
    dict(
        key="mi325x",
        vendor="amd",
        name="AMD Instinct MI325X 256GB",
        # AMD spec page: same CDNA3 compute as MI300X (BF16 1,307.4 TF dense, FP8 2,614.9 dense, FP32
        # 163.4 TF), 256 GB HBM3E at 6 TB/s, Infinity Fabric 896 GB/s aggregate -> 448 per direction, 1000 W.
        bf16_tflops=1307.4,
        fp8_tflops=2614.9,
        fp32_tflops=163.4,
        tf32_tflops=653.7,
        hbm_bytes=256 * GB,
        notes="capacity: the marketed decimal GB (no public device-reported total found)",
        hbm_marketed_gb=256,
        hbm_gbps=6000,
        nvlink_gbps=448,
        net_gbps=400,
        gpus_per_node=8,
        usd_per_hour=3.0,
        power_w=1000,
        source="https://www.amd.com/en/products/accelerators/instinct/mi300/mi325x.html",
        nvlink_topology="mesh",  # (as MI300X: 7 Infinity Fabric links, 64 GB/s per direction to each peer)
    ),
    dict(
        key="a100-40g",
        skypilot_name="A100",
        power_w=400,
        name="NVIDIA A100 SXM4 40GB",
        # datasheet: BF16 312 TF dense (624 sparse); FP32 19.5 TF; TF32 156 dense; 40 GB HBM2 1,555 GB/s;
        # NVLink3 600 GB/s bidirectional; DGX A100: 8 x 200 Gb/s HDR.
        bf16_tflops=312.0,
        fp8_tflops=None,
        fp32_tflops=19.5,
        tf32_tflops=156.0,
        hbm_bytes=42_298_834_944,
        hbm_marketed_gb=40,
        hbm_source=(
            "https://github.com/bottlerocket-os/bottlerocket/pull/3873 (CUDA deviceQuery, NVIDIA "
            "A100-SXM4-40GB: 'Total amount of global memory: 40339 MBytes (42298834944 bytes)' = 39.39 GiB, "
            "cudaDeviceProp totalGlobalMem, what torch reports); 39.50 GiB in "
            "https://github.com/TianheWu/CoSeR/issues/10: the lower kept; nvidia-smi '40960MiB': "
            "https://github.com/modal-labs/modal-client/pull/2797"
        ),
        hbm_gbps=1555,
        nvlink_gbps=300,
        net_gbps=200,
        gpus_per_node=8,
        usd_per_hour=1.3,
        source="https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
    ),
    dict(
        key="a100-80g",
        skypilot_name="A100-80GB",
        power_w=400,
        name="NVIDIA A100 SXM4 80GB",
        # datasheet: as the 40GB part, with 80 GB HBM2e 2,039 GB/s.
        bf16_tflops=312.0,
        fp8_tflops=None,
        fp32_tflops=19.5,
        tf32_tflops=156.0,
        hbm_bytes=int(79.25 * GiB),
        hbm_marketed_gb=80,
        hbm_source=(
            "https://github.com/HiDream-ai/VAREdit/issues/6 and "
            "https://github.com/levihsu/OOTDiffusion/issues/235 (A100 80GB: PyTorch 'total capacity of 79.25 "
            "GiB'); nvidia-smi '81920MiB': https://github.com/modal-labs/modal-client/pull/2797"
        ),
        hbm_gbps=2039,
        nvlink_gbps=300,
        net_gbps=200,
        gpus_per_node=8,
        usd_per_hour=1.8,
        source="https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
    ),
    dict(
        key="mi300x",
        skypilot_name="MI300X",
        vendor="amd",
        power_w=750,
        name="AMD Instinct MI300X 192GB",
        # AMD datasheet: BF16 1,307.4 TF dense (2,614.9 with sparsity); FP8 2,614.9 dense; FP32 vector and
        # matrix 163.4 TF; TF32 653.7 dense; 192 GB HBM3 5.3 TB/s; 7 Infinity Fabric links (128 GB/s each
        # bidirectional), 896 GB/s aggregate
        # bidirectional -> 448 per direction (a fully connected mesh: 64 GB/s per direction to each peer).
        bf16_tflops=1307.4,
        fp8_tflops=2614.9,
        fp32_tflops=163.4,
        tf32_tflops=653.7,
        hbm_bytes=206_141_652_992,
        hbm_marketed_gb=192,
        hbm_source=(
            "https://github.com/ROCm/legacy-rocm-build/issues/4750 (8 x AMD Instinct MI300X, rocm-smi: 'VRAM "
            "Total Memory (B): 206141652992' = 191.98 GiB; a rocm-smi figure, no PyTorch one found). AMD's "
            "'192 GB' is 192 GiB of HBM3"
        ),
        hbm_gbps=5300,
        nvlink_gbps=448,
        net_gbps=400,
        gpus_per_node=8,
        usd_per_hour=2.5,
        source="https://www.amd.com/content/dam/amd/en/documents/instinct-tech-docs/data-sheets/amd-instinct-mi300x-data-sheet.pdf",
        notes="Infinity Fabric mesh: all-reduce over 8 GPUs uses all 7 links; one peer gets 64 GB/s",
        nvlink_topology="mesh",
    ),
    dict(
        key="l40s",
        skypilot_name="L40S",
        power_w=350,
        name="NVIDIA L40S 48GB",
        # datasheet: BF16 362.05 TF dense (733 sparse); FP8 733 dense (1,466 sparse); FP32 91.6 TF;
        # TF32 183 dense; 48 GB GDDR6 864 GB/s; no NVLink (PCIe Gen4 x16).
        bf16_tflops=362.05,
        fp8_tflops=733.0,
        fp32_tflops=91.6,
        tf32_tflops=183.0,
        hbm_bytes=int(44.42 * GiB),
        hbm_marketed_gb=48,
        hbm_source=(
            "https://github.com/stepfun-ai/Step-Video-T2V/issues/8 (8 x L40S: PyTorch 'has a total capacity "
            "of 44.42 GiB'); 44.53 GiB in https://github.com/Wan-Video/Wan2.1/issues/205: the lower kept; "
            "nvidia-smi '46068MiB' (45.0 GiB of the datasheet's '48GB GDDR6 with ECC'): "
            "https://github.com/modal-labs/modal-client/pull/2797"
        ),
        hbm_gbps=864,
        nvlink_gbps=0,
        pcie_gbps=32,  # datasheet: PCIe Gen4 x16, 64 GB/s bidirectional
        net_gbps=100,
        gpus_per_node=8,
        usd_per_hour=1.0,
        source="https://www.nvidia.com/en-us/data-center/l40s/",
    ),
    dict(
        key="rtx4090",
        skypilot_name="RTX4090",
        power_w=450,
        name="NVIDIA GeForce RTX 4090 24GB",
        # Ada whitepaper (appendix table): FP16/BF16 tensor with FP32 accumulate 165.2 TF dense (330.3
        # sparse) -- training accumulates in FP32; FP8 with FP32 accumulate 330.3 dense; FP32 82.6 TF;
        # 24 GB GDDR6X 1,008 GB/s; no NVLink. $0.50/hour: a typical community-cloud rental price.
        bf16_tflops=165.2,
        fp8_tflops=330.3,
        fp32_tflops=82.6,
        tf32_tflops=82.6,
        hbm_bytes=int(23.52 * GiB),
        hbm_marketed_gb=24,
        hbm_source=(
            "https://github.com/Soul-AILab/SoulX-FlashTalk/issues/5 (RTX 4090 24G: PyTorch 'GPU 0 has a total "
            "capacity of 23.52 GiB'); 23.64 GiB in https://github.com/3DTopia/Phidias-Diffusion/issues/8: the "
            "lower kept; nvidia-smi '24564MiB': https://github.com/RLinf/RLinf/issues/255"
        ),
        hbm_gbps=1008,
        nvlink_gbps=0,
        pcie_gbps=32,  # Ada whitepaper: PCIe Gen4 x16 (64 GB/s bidirectional)
        net_gbps=10,
        gpus_per_node=8,
        usd_per_hour=0.5,
        source="https://images.nvidia.com/aem-dam/Solutions/geforce/ada/nvidia-ada-gpu-architecture.pdf",
    ),
    dict(
        key="cpu",
        name="Local CPU (pseudo-device)",
        # Not a datasheet part: a deliberately conservative stand-in so that `llmc plan` on a laptop/CI box
        # gives finite, pessimistic numbers. 0.5 TFLOPS ~ a few AVX-512/AMX cores doing bf16 GEMMs in
        # PyTorch; 16 GiB of RAM assumed usable by the job; 20 GB/s DRAM bandwidth; no GPU fabric;
        # 10 Gb/s Ethernet; one "device" per node (multi-process CPU runs are gloo over loopback/TCP);
        # price 0 (you already own it). No fp8.
        bf16_tflops=0.5,
        fp8_tflops=None,
        fp32_tflops=0.5,
        tf32_tflops=None,
        hbm_bytes=16 * GiB,
        hbm_source="llmc convention (no device): 16 GiB of host RAM assumed usable by the job",
        hbm_gbps=20,
        nvlink_gbps=0,
        net_gbps=10,
        gpus_per_node=1,
        usd_per_hour=0.0,
        source="llmc convention (no datasheet): conservative local-CPU stand-in",
    ),
]

GPUS: dict[str, GPU] = {r["key"]: GPU(**r) for r in _ROWS}

_ALIASES = {
    "h100": "h100-sxm",
    "h100-sxm5": "h100-sxm",
    "h200-sxm": "h200",
    "a100": "a100-80g",
    "a100-80gb": "a100-80g",
    "a100-40gb": "a100-40g",
    "4090": "rtx4090",
    "rtx-4090": "rtx4090",
    "mi300": "mi300x",
    "h100-96g": "h100-hbm2e-96g",
    "gb200-nvl72": "gb200",
    "gb300-nvl72": "gb300",
    "b300-sxm": "b300",
}


def get_gpu(key: str) -> GPU | None:
    """Look up a GPU by key (case-insensitive; a few common aliases accepted). None if unknown."""
    k = key.strip().lower()
    k = _ALIASES.get(k, k)
    return GPUS.get(k)


_PRECISION = {
    "bf16": "bf16_tflops",
    "fp16": "bf16_tflops",  # same tensor-core rate as bf16 on every part listed
    "fp8": "fp8_tflops",
    "nvfp4": "fp4_tflops",  # NVFP4 (training.precision nvfp4): Blackwell's FP4 tensor cores
    "fp32": "fp32_tflops",
    "tf32": "tf32_tflops",
}


def supports(gpu: GPU, precision: str) -> bool:
    """True when the part has a peak for this precision (fp8 needs Hopper/Ada/Blackwell/CDNA3, nvfp4 Blackwell)."""
    attr = _PRECISION.get(precision)
    return attr is not None and getattr(gpu, attr) is not None


def peak_flops(gpu: GPU, precision: str) -> float:
    """Dense peak in FLOP/s for a training precision (``bf16``, ``fp16``, ``fp8``, ``nvfp4``, ``fp32``, ``tf32``).

    Raises ValueError for an unknown precision or one the part lacks (fp8 on A100); callers that
    want a diagnostic should check :func:`supports` first.

    Note for fp8: torchao float8 training only runs the Linear matmuls in fp8 (attention, norms and
    the optimizer stay bf16/fp32), so the fp8 peak is an upper bound; MFU is conventionally quoted
    against the bf16 peak. The same holds for nvfp4 (FP4 tensor cores), which converts the block linears only.
    """
    attr = _PRECISION.get(precision)
    if attr is None:
        raise ValueError(f"unknown precision {precision!r}; expected one of {sorted(_PRECISION)}")
    tf = getattr(gpu, attr)
    if tf is None:
        raise ValueError(f"{gpu.name} has no {precision} tensor cores")
    return float(tf) * TERA


# Sustained tensor-core clock under a power cap below the rated board power. CMOS dynamic power is
# P = C V^2 f and DVFS lowers the voltage with the frequency (V ~ f), so P ~ f^3 and f ~ P^(1/3)
# (Weste & Harris, "CMOS VLSI Design", 4th ed., sec. 5.1 on dynamic power and DVFS). An approximation: it
# ignores static power and memory-bound phases.
DVFS_EXPONENT = 1 / 3


def nvlink_group(gpu: GPU) -> int:
    """GPUs one NVLink fabric joins: the table's ``nvlink_domain`` (a GB200 / GB300 NVL72 rack: 72 GPUs over
    18 nodes of 4, https://www.nvidia.com/en-us/data-center/gb200-nvl72/), else the node; where a TP group may reach
    (TP needs NVLink bandwidth: Narayanan et al. 2021, arXiv:2104.04473 §3.2) and what the time model charges
    NVLink rather than the network for."""
    return (getattr(gpu, "nvlink_domain", None) if gpu.nvlink_gbps > 0 else None) or gpu.gpus_per_node


def nvlink_segment_nodes(gpu: GPU, tp: int, n_nodes: int) -> int | None:
    """Nodes per Slurm segment (``sbatch --segment``, the topology/block plugin: each segment of the allocation lies in
    one block, https://slurm.schedmd.com/topology.html) that keep every tensor-parallel group, and as much of the job
    as fits, inside one NVLink domain, as the plan times them (:func:`nvlink_group`): the largest divisor of
    ``n_nodes`` no larger than the domain's nodes and a multiple of the nodes one TP group spans. None where the
    domain is the node, or the job one node (nothing to ask)."""
    gpn = max(1, int(gpu.gpus_per_node))
    dom = nvlink_group(gpu)
    if dom <= gpn or n_nodes <= 1:
        return None
    per_domain, tp_nodes = dom // gpn, max(1, -(-tp // gpn))
    best = max((d for d in range(1, min(per_domain, n_nodes) + 1) if n_nodes % d == 0 and d % tp_nodes == 0),
               default=None)
    return best if best is not None and best > 1 else None


def clock_factor(gpu: GPU) -> float:
    """Fraction of the datasheet tensor throughput sustained at ``power_w`` (1.0 at or above ``tdp_w``)."""
    if not gpu.power_w or not gpu.tdp_w or gpu.power_w >= gpu.tdp_w:
        return 1.0
    return (gpu.power_w / gpu.tdp_w) ** DVFS_EXPONENT


#: spec override key -> (GPU field, multiplier to the table's unit)
_OVERRIDE_FIELDS = {
    "name": ("name", None),
    "bf16_tflops": ("bf16_tflops", 1.0),
    "fp8_tflops": ("fp8_tflops", 1.0),
    "fp4_tflops": ("fp4_tflops", 1.0),
    "fp32_tflops": ("fp32_tflops", 1.0),
    "tf32_tflops": ("tf32_tflops", 1.0),
    "hbm_gib": ("hbm_bytes", float(GiB)),
    "hbm_tbps": ("hbm_gbps", 1000.0),
    "power_w": ("power_w", 1.0),
    "nvlink_gbps": ("nvlink_gbps", 1.0),
    "pcie_gbps": ("pcie_gbps", 1.0),
    "inter_node_gbps": ("net_gbps", 1.0),
    "gpus_per_node": ("gpus_per_node", None),
    "nvlink_domain": ("nvlink_domain", None),
    "mx_block_scaling": ("mx_block_scaling", None),
    "usd_per_gpu_hour": ("usd_per_hour", 1.0),
    "vendor": ("vendor", None),
    "skypilot_name": ("skypilot_name", None),
}
CUSTOM_REQUIRED = ("bf16_tflops", "hbm_gib", "hbm_tbps")


def with_overrides(key: str, overrides: dict | None) -> GPU | None:
    """The GPU ``key`` with ``overrides`` applied (keys of :data:`_OVERRIDE_FIELDS`, None = unset).

    An unknown ``key`` is a custom GPU: it needs ``base`` (a table key to start from) or at least
    bf16_tflops, hbm_gib and hbm_tbps; the rest default to "none" (no fp8, no NVLink, 8 GPUs per node).
    Returns None when the key is unknown and the overrides cannot define it.
    """
    import dataclasses

    ov = {k: v for k, v in (overrides or {}).items() if v is not None}
    base_key = ov.pop("base", None)
    gpu = get_gpu(base_key) if base_key else get_gpu(key)
    if gpu is None:
        if not all(k in ov for k in CUSTOM_REQUIRED):
            return None
        gpu = GPU(key=key.strip().lower(), name=str(ov.get("name", key)), bf16_tflops=0.0, fp8_tflops=None,
                  fp32_tflops=0.0, hbm_bytes=0, hbm_gbps=0.0, nvlink_gbps=0.0, net_gbps=400.0, gpus_per_node=8,
                  usd_per_hour=0.0, source="user-defined in the spec (hardware.gpu_overrides)")
        if "fp32_tflops" not in ov:
            ov["fp32_tflops"] = ov["bf16_tflops"] / 16  # placeholder ratio only used for fp32 runs
    elif base_key:
        gpu = dataclasses.replace(gpu, key=key.strip().lower(), source=gpu.source + " (+ spec overrides)")
    changes = {}
    for k, v in ov.items():
        field_, mult = _OVERRIDE_FIELDS[k]
        changes[field_] = int(v * mult) if field_ == "hbm_bytes" else (v if mult is None else float(v) * mult)
    if "hbm_gib" in ov:  # the spec's device-reported GiB replaces the table's (and its source)
        changes["hbm_source"] = "spec: hardware.gpu_overrides.hbm_gib"
    if any(k.endswith("_tflops") for k in ov):
        # peaks given in the spec are the part's as it runs (at its power_w, the spec's or the table's): not derated
        changes["tdp_w"] = None
    elif "power_w" in changes and gpu.tdp_w is None and gpu.power_w:
        # the table's peaks are quoted at the entry's own board power: a cap set in the spec lowers the clocks
        # from there (clock_factor), as the 500 W entry's do from the 700 W its peaks are quoted at
        changes["tdp_w"] = gpu.power_w
    return dataclasses.replace(gpu, **changes) if changes else gpu
