"""SE(2,N) orientation-disentangled VAE in plain PyTorch.

M. W. Lafarge, J. P. W. Pluim, M. Veta, "Orientation-disentangled unsupervised representation learning for
computational pathology" (arXiv:2008.11673, 2020); equation numbers below are that paper's. Layers follow
tueimage/SE2CNN (Bekkers & Lafarge); the angle sampler is inverse-transform sampling of the paper's Eq. 4 (no
official code of the VAE was found).

The file reads top to bottom:
  §1  rotating a k×k kernel by θ_r = 2πr/N: one fixed linear operator (a buffer, built once)
  §2  lifting convolution      R² → SE(2,N)       (B, C, H, W)    -> (B, C', N, H, W)
  §3  group convolution        SE(2,N) → SE(2,N)  (B, C, N, H, W) -> (B, C', N, H, W), one conv2d
  §4  group batch norm, orientation pooling, 2×2 spatial pooling and upsampling
  §5  projection convolution   SE(2,N) → R²       the decoder's last layer, back to an image
  §6  angle latents z_ORI: the pmf of Eq. 4, inverse-transform sampling, re-encoding, KL to U(0, 2π)
  §7  SE2VAE: encoder, decoder, loss (Eq. 5), Ada-GVAE pair loss, representation

Conventions. Feature maps on SE(2,N) are tensors (B, C, N, H, W); orientation index r stands for the
angle θ_r = 2πr/N. Rotating the input by +90° with torch.rot90(x, 1, dims=(-2, -1)) rotates every
feature map the same way and rolls the orientation axis by +N/4 (Eq. 2a and Eq. 3); this is exact for
multiples of 90° (given even spatial sizes) and approximate (bilinear kernels) for other multiples of
2π/N. The tests measure both.

Only torch and math are imported, so this file can be copied into another project.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

TWO_PI = 2.0 * math.pi


# --- §1  Kernel rotation (se2cnn rotation_matrix.py): a fixed, sparse linear operator ----------------------------

def rotation_matrix(kernel_size, n_angles, dtype=torch.float32):
    """(N·k·k, k·k) matrix M; row block r rotates a flattened k×k kernel by θ_r = 2πr/N.

    Centre c = (k-1)/2 (odd k: the middle tap; even k: between the four middle taps). Target tap
    (i, j) reads the source point  i' = cosθ (i-c) + sinθ (j-c) + c,  j' = -sinθ (i-c) + cosθ (j-c) + c
    bilinearly from its 4 grid neighbours; neighbours outside the grid count as 0. Taps outside the
    disk (i-c)² + (j-c)² > (k/2)² are zeroed as targets and as sources (5×5: the 4 corners), so the
    operator never reads or writes a corner. For θ = 90° the block equals torch.rot90 on the disk.
    """
    k = int(kernel_size)
    c = (k - 1) / 2
    grid = torch.arange(k, dtype=torch.float64) - c
    a, b = (t.reshape(-1) for t in torch.meshgrid(grid, grid, indexing="ij"))  # centred tap coords
    disk = a ** 2 + b ** 2 <= (k / 2) ** 2 + 1e-9
    taps = torch.arange(k * k)
    M = torch.zeros(n_angles, k * k, k * k, dtype=torch.float64)
    for r in range(n_angles):
        th = TWO_PI * r / n_angles
        si = math.cos(th) * a + math.sin(th) * b + c
        sj = -math.sin(th) * a + math.cos(th) * b + c
        si, sj = torch.round(si * 1e9) / 1e9, torch.round(sj * 1e9) / 1e9  # cos(π/2) = 6e-17 → 0
        i0, j0 = torch.floor(si), torch.floor(sj)
        wi, wj = si - i0, sj - j0
        for di, dj, w in ((0, 0, (1 - wi) * (1 - wj)), (1, 0, wi * (1 - wj)),
                          (0, 1, (1 - wi) * wj), (1, 1, wi * wj)):
            ni, nj = i0 + di, j0 + dj
            inside = (ni >= 0) & (ni < k) & (nj >= 0) & (nj < k)
            src = (ni.clamp(0, k - 1) * k + nj.clamp(0, k - 1)).long()
            ok = inside & disk & disk[src] & (w > 0)
            M[r].index_put_((taps[ok], src[ok]), w[ok], accumulate=True)
    return M.reshape(n_angles * k * k, k * k).to(dtype)


def rotate_kernels(weight, n_angles, matrix=None):
    """The N rotated copies of k×k kernels: weight (..., k, k) -> (..., N, k, k).

    One matrix product with the fixed operator of rotation_matrix (pass the layer's buffer as
    `matrix`; without it the operator is built on the fly), so gradients reach `weight` linearly.
    """
    k = weight.shape[-1]
    if matrix is None:
        matrix = rotation_matrix(k, n_angles, weight.dtype).to(weight.device)
    return (weight.flatten(-2) @ matrix.t()).unflatten(-1, (n_angles, k, k))


def _padding(kernel_size, stride):
    """Zero padding that keeps rot90 equivariance: 'same' for odd k (stride 1); k = 2 + 2p for stride 2.

    A stride-2 layer maps 2×2 blocks to pixels exactly like 2×2 pooling does, which needs an even
    kernel centred between pixels (like the 4×4/stride-2 convs of the disentanglement_lib VAE).
    """
    if stride == 1 and kernel_size % 2 == 1:
        return (kernel_size - 1) // 2
    if stride == 2 and kernel_size % 2 == 0 and kernel_size >= 2:
        return (kernel_size - 2) // 2
    raise ValueError(f"kernel_size={kernel_size} with stride={stride} breaks rotation equivariance; "
                     "use an odd kernel with stride 1 or an even kernel with stride 2")


def _init_weight(weight, fan_in):
    """He-normal initialisation; fan_in counts only taps inside the disk."""
    with torch.no_grad():
        weight.normal_(0.0, math.sqrt(2.0 / fan_in))


def _disk_taps(k):
    c = (k - 1) / 2
    return sum(1 for i in range(k) for j in range(k) if (i - c) ** 2 + (j - c) ** 2 <= (k / 2) ** 2 + 1e-9)


# --- §2  Lifting convolution R² → SE(2,N) (se2cnn layers.z2_se2n)
#     y_{c',r}(p) = Σ_c Σ_q x_c(p + q) (R_θr k_{c',c})(q)   (cross-correlation with rotated kernels)

class LiftingConv2d(nn.Module):
    """(B, C, H, W) -> (B, C', N, H/stride, W/stride): C' kernels, each in its N rotated copies.

    All N·C' filters are stacked into one conv2d. stride=2 needs an even kernel (see _padding).
    """

    def __init__(self, in_ch, out_ch, kernel_size=5, n_angles=8, stride=1):
        super().__init__()
        self.in_ch, self.out_ch, self.kernel_size, self.n_angles, self.stride = in_ch, out_ch, kernel_size, n_angles, stride
        self.padding = _padding(kernel_size, stride)
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_ch))  # one bias per channel, shared by all N angles
        self.register_buffer("rotation", rotation_matrix(kernel_size, n_angles), persistent=False)
        _init_weight(self.weight, in_ch * _disk_taps(kernel_size))

    def kernel(self):
        """The expanded conv2d weight (C'·N, C, k, k), output channel index c'·N + r."""
        w = rotate_kernels(self.weight, self.n_angles, self.rotation)  # (C', C, N, k, k)
        return w.transpose(1, 2).reshape(self.out_ch * self.n_angles, self.in_ch, self.kernel_size, self.kernel_size)

    def forward(self, x):
        y = F.conv2d(x, self.kernel(), self.bias.repeat_interleave(self.n_angles), self.stride, self.padding)
        return y.unflatten(1, (self.out_ch, self.n_angles))


# --- §3  Group convolution SE(2,N) → SE(2,N) (se2cnn layers.se2n_se2n)
#     y_{c',r}(p) = Σ_{c,s} Σ_q f_{c,s}(p + q) (R_θr k_{c',c,s-r})(q)
#     For output orientation r, every θ-plane of the kernel is rotated by θ_r and the input-
#     orientation axis is rolled by r. Both are folded into one expanded kernel, so a layer is a
#     single conv2d from C·N to C'·N channels. Cost: that of a plain conv2d with N·C' output maps
#     (the expansion is ~1% of it) and the same as e2cnn's R2Conv on C_N-regular fields, which
#     also expands its weights to a dense filter on every call (an earlier benchmarks/bench.py measured it).

class GroupConv2d(nn.Module):
    """(B, C, N, H, W) -> (B, C', N, H, W); weight (C', C, N, k, k), axis 2 = relative orientation."""

    def __init__(self, in_ch, out_ch, kernel_size=5, n_angles=8):
        super().__init__()
        self.in_ch, self.out_ch, self.kernel_size, self.n_angles = in_ch, out_ch, kernel_size, n_angles
        self.padding = _padding(kernel_size, 1)
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, n_angles, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.register_buffer("rotation", rotation_matrix(kernel_size, n_angles), persistent=False)
        # roll_index[r, s] picks rotated[..., (s - r) mod N, r] from the (N_s·N_r) flattened axis
        r, s = torch.meshgrid(torch.arange(n_angles), torch.arange(n_angles), indexing="ij")
        self.register_buffer("roll_index", (s - r).remainder(n_angles) * n_angles + r, persistent=False)
        _init_weight(self.weight, in_ch * n_angles * _disk_taps(kernel_size))

    def kernel(self):
        """The expanded conv2d weight (C'·N, C·N, k, k): rows c'·N + r, columns c·N + s."""
        N, k = self.n_angles, self.kernel_size
        w = rotate_kernels(self.weight, N, self.rotation)  # (C', C, N_s, N_r, k, k): rotated by θ_r
        w = w.flatten(2, 3)[:, :, self.roll_index]  # (C', C, N_r, N_s, k, k): orientation axis rolled by r
        return w.transpose(1, 2).reshape(self.out_ch * N, self.in_ch * N, k, k)

    def forward(self, x):
        y = F.conv2d(x.flatten(1, 2), self.kernel(), self.bias.repeat_interleave(self.n_angles), 1, self.padding)
        return y.unflatten(1, (self.out_ch, self.n_angles))


# --- §4  Normalisation, orientation pooling, spatial pooling and upsampling --------------------------------------

class GroupBatchNorm(nn.BatchNorm3d):
    """Batch norm for (B, C, N, H, W): one mean, variance and affine pair per channel, pooled over
    B, N, H and W (paper §5.1: "the orientation-axis in the computation of the batch statistics";
    e2cnn InnerBatchNorm). Statistics per (channel, orientation) would break equivariance: BatchNorm3d
    over (B, C, N, H, W) is exactly this."""


def orientation_pool(x, mode="max"):
    """Projection onto rotation-invariant features: max or mean over the orientation axis (dim 2).

    (B, C, N, H, W) -> (B, C, H, W), or (B, C, N) -> (B, C). Max as in se2cnn / e2cnn GroupPooling;
    mean is the paper's projection layer for μ_ISO, σ_ISO and gives smoother gradients.
    """
    assert mode in ("max", "mean"), mode
    return x.amax(dim=2) if mode == "max" else x.mean(dim=2)


def spatial_max_pool(x):
    """2×2 max pooling of every orientation plane: (B, C, N, H, W) -> (B, C, N, H/2, W/2).

    Exactly rot90-equivariant when H and W are even (2×2 blocks map onto 2×2 blocks)."""
    return F.max_pool2d(x.flatten(1, 2), 2).unflatten(1, x.shape[1:3])


def spatial_upsample(x):
    """2× nearest-neighbour upsampling of every orientation plane: (B, C, N, H, W) -> (B, C, N, 2H, 2W)."""
    return F.interpolate(x.flatten(1, 2), scale_factor=2, mode="nearest").unflatten(1, x.shape[1:3])


# --- §5  Projection convolution SE(2,N) → R² (the decoder's counterpart of lifting)
#     y_{c'}(p) = Σ_{c,s} Σ_q f_{c,s}(p + q) (R_θs k_{c',c})(q)
#     Input orientation s is read with the kernel rotated by θ_s and summed, so rolling the
#     orientation axis and rotating the maps just rotates the output image. With stride=2 it is the
#     transposed (adjoint) of a stride-2 lifting and doubles the resolution, so the decoder never
#     holds N-fold feature maps at full resolution (the paper uses a group conv at full resolution,
#     a mean projection and a 1×1 conv; too slow for a CPU reference).

class ProjectionConv2d(nn.Module):
    """(B, C, N, H, W) -> (B, C', H·stride, W·stride); stride=2 is a transposed conv with an even kernel."""

    def __init__(self, in_ch, out_ch, kernel_size=5, n_angles=8, stride=1):
        super().__init__()
        self.in_ch, self.out_ch, self.kernel_size, self.n_angles, self.stride = in_ch, out_ch, kernel_size, n_angles, stride
        self.padding = _padding(kernel_size, stride)
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.register_buffer("rotation", rotation_matrix(kernel_size, n_angles), persistent=False)
        _init_weight(self.weight, in_ch * n_angles * _disk_taps(kernel_size) // stride ** 2)

    def forward(self, x):
        w = rotate_kernels(self.weight, self.n_angles, self.rotation)  # (C', C, N, k, k)
        k = self.kernel_size
        if self.stride == 1:
            return F.conv2d(x.flatten(1, 2), w.reshape(self.out_ch, -1, k, k), self.bias, 1, self.padding)
        w = w.permute(1, 2, 0, 3, 4).reshape(-1, self.out_ch, k, k)  # conv_transpose2d wants (C·N, C', k, k)
        return F.conv_transpose2d(x.flatten(1, 2), w, self.bias, self.stride, self.padding)


# --- §6  Angle latents z_ORI (paper §4.3, Eq. 4)
#     The encoder gives logits a ∈ R^N per angle variable; rotating the input by 2πm/N rolls a by m
#     (Eq. 3). Q = softmax(a) is a pmf over N bins of width Δ = 2π/N. We centre bin i on θ_i = iΔ,
#     the angle of orientation channel i (Eq. 4 writes the edges as [(j-1)Δ, jΔ); centring only shifts
#     all angles by Δ/2 and lines bins up with the lifting angles and the re-encoding below). The
#     density is uniform inside each bin: q(θ) = Q_i / Δ.

def inverse_transform_sample(p, u):
    """θ = C⁻¹(u) ∈ [0, 2π) for pmfs p (..., N) and uniform noise u (...) in [0, 1].

    Bin i is the first with C_i = Σ_{m≤i} p_m > u, so C_{i-1} ≤ u < C_i and an empty bin is never
    drawn (not even for u = 0); inside it θ moves linearly from (i - ½)Δ to (i + ½)Δ as u goes from
    C_{i-1} to C_i. Reparameterised: i is held constant, gradients reach p through C_{i-1} and p_i.
    Equivariance holds in distribution (the CDF starts at bin 0).
    """
    n = p.shape[-1]
    cdf = p.cumsum(-1)
    u_ = u.detach().unsqueeze(-1).to(cdf.dtype)
    i = torch.searchsorted(cdf.detach().contiguous(), u_, right=True).clamp_(max=n - 1)  # right: C_i > u
    p_i = p.gather(-1, i).squeeze(-1)
    cdf_before = cdf.gather(-1, i).squeeze(-1) - p_i  # C_{i-1}
    within = ((u - cdf_before) / p_i.clamp_min(1e-12)).clamp(0.0, 1.0)  # position inside bin i
    return torch.remainder((i.squeeze(-1).to(p.dtype) - 0.5 + within) * (TWO_PI / n), TWO_PI)


def angle_to_bins(theta, n_angles):
    """Two-bin linear re-encoding ("label smoothing", §4.3): θ (...) -> v (..., N).

    With t = θ/Δ, i0 = ⌊t⌋, w = t - i0: v[i0 mod N] = 1 - w, v[(i0 + 1) mod N] = w. v sums to 1, is
    one-hot at θ = iΔ, continuous and 2π-periodic in θ, and rolls by m when θ grows by mΔ.
    """
    t = theta / (TWO_PI / n_angles)
    i0 = torch.floor(t)
    w = (t - i0).unsqueeze(-1)
    i0 = i0.long().remainder(n_angles)
    lower = F.one_hot(i0, n_angles).to(theta.dtype)
    upper = F.one_hot((i0 + 1).remainder(n_angles), n_angles).to(theta.dtype)
    return (1 - w) * lower + w * upper


def kl_to_uniform(p):
    """KL(q ‖ U(0, 2π)) for the piecewise-uniform density of pmf p (..., N): Σ_i p_i ln(N p_i) = ln N − H(p)."""
    return math.log(p.shape[-1]) + (p * p.clamp_min(torch.finfo(p.dtype).tiny).log()).sum(-1)  # 0·ln 0 = 0


def kl_categorical(logp1, logp2):
    """KL(p1 ‖ p2) between pmfs given as log-probabilities (..., N) -> (...)."""
    return (logp1.exp() * (logp1 - logp2)).sum(-1)


def kl_normal(mu, logvar):
    """KL(N(μ, σ²) ‖ N(0, 1)) per dimension = ½(μ² + σ² − ln σ² − 1)."""
    return 0.5 * (mu ** 2 + logvar.exp() - logvar - 1)


def kl_normal_pair(mu1, logvar1, mu2, logvar2):
    """KL(N(μ1, σ1²) ‖ N(μ2, σ2²)) per dimension (half of disentanglement_lib's δ)."""
    return 0.5 * ((logvar1 - logvar2).exp() + (mu2 - mu1) ** 2 / logvar2.exp() - 1 + logvar2 - logvar1)


def ada_gvae_average(mu1, logvar1, logp1, mu2, logvar2, logp2):
    """Ada-GVAE posterior averaging (disentanglement_lib group_vae_argmax, per example)
    over all latent units of the SE(2,N)-VAE. This Gaussian + categorical combination is ours: no
    published code has it.

    δ per unit: Gaussian KL(q1 ‖ q2) for each z_ISO dim, categorical KL(p1 ‖ p2) for each z_ORI pmf
    (both in nats). τ = ½(max δ + min δ) per example; units with δ < τ are shared (all units when
    every δ is equal): Gaussians get μ̄ = ½(μ1 + μ2), σ̄² = ½(σ1² + σ2²), pmfs get p̄ = ½(p1 + p2).
    Returns (mu1, logvar1, logp1), (mu2, logvar2, logp2), shared (B, n_iso + n_ori) bool.
    """
    delta = torch.cat([kl_normal_pair(mu1, logvar1, mu2, logvar2), kl_categorical(logp1, logp2)], dim=1)
    d_max, d_min = delta.amax(1, keepdim=True), delta.amin(1, keepdim=True)
    shared = (delta < 0.5 * (d_max + d_min)) | (d_max == d_min)
    n_iso = mu1.shape[1]
    s_iso, s_ori = shared[:, :n_iso], shared[:, n_iso:, None]
    mu_bar = 0.5 * (mu1 + mu2)
    logvar_bar = torch.log(0.5 * (logvar1.exp() + logvar2.exp()))  # ln ½(σ1² + σ2²), as drl.ada_gvae_aggregate
    logp_bar = torch.logaddexp(logp1, logp2) - math.log(2.0)  # ln ½(p1 + p2): log-pmfs underflow in exp
    q1 = (torch.where(s_iso, mu_bar, mu1), torch.where(s_iso, logvar_bar, logvar1), torch.where(s_ori, logp_bar, logp1))
    q2 = (torch.where(s_iso, mu_bar, mu2), torch.where(s_iso, logvar_bar, logvar2), torch.where(s_ori, logp_bar, logp2))
    return q1, q2, shared


# --- §7  The SE(2,N)-VAE (paper §4.3 and appendix B.2, scaled to 64×64 inputs and a CPU budget)
#
#   encoder q_φ(z_ISO, z_ORI | x):
#     lifting 6×6 / stride 2 ─ GBN ─ LeakyReLU ─ pool        64 → 32 → 16
#     group conv 5×5 ─ GBN ─ LeakyReLU ─ pool                16 → 8
#     group conv 5×5 ─ GBN ─ LeakyReLU ─ pool                 8 → 4
#     group conv 5×5 → (2·n_iso + n_ori) SE(2,N) channels, mean over the 4×4 positions:
#        2·n_iso channels, mean over N (projection layer)  →  μ_ISO, ln σ²_ISO   (invariant, Eq. 2b)
#        n_ori channels                                      →  logits of Q_ORI  (equivariant, Eq. 3)
#   decoder p_ψ(x | z_ISO, z_ORI):
#     [z_ISO repeated over N ; angle_to_bins(z_ORI)] broadcast to 4×4
#     group conv 5×5 ─ GBN ─ LeakyReLU ─ upsample (×3)      4 → 8 → 16 → 32
#     projection conv 6×6 / stride 2 (transposed)           32 → 64 Bernoulli logits
#   The stride-2 lifting (an even 6×6 kernel, centred between pixels) replaces the paper's full-
#   resolution lifting + pool, and the transposed projection its full-resolution group conv +
#   projection + 1×1 conv: on a CPU the N-fold maps at 64×64 would dominate the cost.

class SE2VAE(nn.Module):
    """Orientation-disentangled VAE with z_ISO (Gaussian, rotation invariant) and z_ORI (angles).

    Implements the project VAE protocol: model(batch, beta), loss, pair_loss, representation, config.
    `width` gives the channels per orientation of the three encoder blocks (the decoder mirrors them); `beta_ori`
    (None: same as beta) is β_ORI of Eq. 5.
    """

    def __init__(self, in_ch=3, size=64, n_iso=8, n_ori=2, n_angles=8, kernel_size=5, width=(2, 4, 8), beta_ori=None):
        super().__init__()
        width = tuple(int(c) for c in width)
        if size % 16 != 0 or size < 16:
            raise ValueError(f"SE2VAE size must be a multiple of 16 (stride-2 lifting and 3 poolings), got {size}")
        if n_iso < 1 or n_ori < 1:
            raise ValueError(f"SE2VAE needs n_iso >= 1 and n_ori >= 1, got n_iso={n_iso}, n_ori={n_ori}")
        if kernel_size % 2 != 1:
            raise ValueError(f"SE2VAE kernel_size must be odd (5 in the paper), got {kernel_size}")
        if len(width) != 3 or min(width) < 1:
            raise ValueError(f"SE2VAE width must be 3 positive channel counts, e.g. (2, 4, 8), got {width}")
        self.in_ch, self.size, self.n_iso, self.n_ori, self.n_angles = in_ch, size, n_iso, n_ori, n_angles
        self.kernel_size, self.width, self.beta_ori = kernel_size, width, beta_ori
        c1, c2, c3 = width
        k, n = kernel_size, n_angles
        # encoder
        self.lift = LiftingConv2d(in_ch, c1, k + 1, n, stride=2)
        self.bn1 = GroupBatchNorm(c1)
        self.conv2, self.bn2 = GroupConv2d(c1, c2, k, n), GroupBatchNorm(c2)
        self.conv3, self.bn3 = GroupConv2d(c2, c3, k, n), GroupBatchNorm(c3)
        self.head = GroupConv2d(c3, 2 * n_iso + n_ori, k, n)
        # decoder
        self.dconv1, self.dbn1 = GroupConv2d(n_iso + n_ori, c3, k, n), GroupBatchNorm(c3)
        self.dconv2, self.dbn2 = GroupConv2d(c3, c2, k, n), GroupBatchNorm(c2)
        self.dconv3, self.dbn3 = GroupConv2d(c2, c1, k, n), GroupBatchNorm(c1)
        self.project = ProjectionConv2d(c1, in_ch, k + 1, n, stride=2)

    @property
    def config(self):
        """JSON-able constructor arguments (recorded in checkpoints)."""
        return dict(in_ch=self.in_ch, size=self.size, n_iso=self.n_iso, n_ori=self.n_ori, n_angles=self.n_angles,
                    kernel_size=self.kernel_size, width=list(self.width), beta_ori=self.beta_ori)

    def _check_images(self, *xs):
        """Float images (B, in_ch, size, size), the same shape for both images of a pair: another size would be
        encoded without an error (the encoder averages over positions), so it is refused here."""
        shape = (xs[0].shape[0], self.in_ch, self.size, self.size)
        if any(not x.is_floating_point() or tuple(x.shape) != shape for x in xs):
            raise ValueError(f"SE2VAE expects float images in [0, 1] of shape (B, {self.in_ch}, {self.size}, "
                             f"{self.size}), the same for x1 and x2; got {[(x.dtype, tuple(x.shape)) for x in xs]}")

    # encoder ---------------------------------------------------------------------------------
    def encode(self, x):
        """x (B, C, H, W) -> μ_ISO (B, n_iso), ln σ²_ISO (B, n_iso), ln Q_ORI (B, n_ori, N)."""
        h = spatial_max_pool(F.leaky_relu(self.bn1(self.lift(x)), 0.2))
        h = spatial_max_pool(F.leaky_relu(self.bn2(self.conv2(h)), 0.2))
        h = spatial_max_pool(F.leaky_relu(self.bn3(self.conv3(h)), 0.2))
        h = self.head(h).mean(dim=(3, 4))  # (B, 2·n_iso + n_ori, N): invariant to spatial rotation
        iso = orientation_pool(h[:, : 2 * self.n_iso], "mean")  # Eq. 2b: invariant
        mu, logvar = iso[:, : self.n_iso], iso[:, self.n_iso:]
        log_q = F.log_softmax(h[:, 2 * self.n_iso:], dim=-1)  # Eq. 4: pmf over N angle bins, Eq. 3
        return mu, logvar, log_q

    # decoder ---------------------------------------------------------------------------------
    def decode(self, z_iso, z_ori):
        """z_iso (B, n_iso), angles z_ori (B, n_ori) in radians -> Bernoulli logits (B, C, H, W)."""
        n, s = self.n_angles, self.size // 16
        z = torch.cat([z_iso.unsqueeze(-1).expand(-1, -1, n), angle_to_bins(z_ori, n)], dim=1)
        h = z[..., None, None].expand(-1, -1, -1, s, s)  # an SE(2,N) map constant over the 4×4 grid
        h = spatial_upsample(F.leaky_relu(self.dbn1(self.dconv1(h)), 0.2))
        h = spatial_upsample(F.leaky_relu(self.dbn2(self.dconv2(h)), 0.2))
        h = spatial_upsample(F.leaky_relu(self.dbn3(self.dconv3(h)), 0.2))
        return self.project(h)

    def sample_latents(self, mu, logvar, log_q):
        """z_ISO = μ + ε σ (ε ~ N(0, 1)); z_ORI = inverse_transform_sample(Q, u) (u ~ U(0, 1))."""
        z_iso = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        z_ori = inverse_transform_sample(log_q.exp(), torch.rand(log_q.shape[:-1], dtype=log_q.dtype, device=log_q.device))
        return z_iso, z_ori

    def forward(self, batch, beta):
        """The training objective, as for the project's other VAEs: `loss` of a batch of images, `pair_loss`
        of a pair batch (x1, x2). (The noise of both latents is drawn inside.)"""
        return self.pair_loss(*batch, beta) if isinstance(batch, (tuple, list)) else self.loss(batch, beta)

    # Eq. 5 -----------------------------------------------------------------------------------
    def _terms(self, x, beta, mu, logvar, log_q):
        """Per example, Eq. 5 negated: (recon + β_ISO·KL_ISO + β_ORI·KL_ORI, recon, KL_ISO + KL_ORI) with
        recon = −log p_ψ(x | z) (Bernoulli, summed over pixels), β_ISO = beta, β_ORI = beta_ori (or beta)."""
        logits = self.decode(*self.sample_latents(mu, logvar, log_q))
        recon = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        kl_iso, kl_ori = kl_normal(mu, logvar).sum(1), kl_to_uniform(log_q.exp()).sum(1)
        beta_ori = beta if self.beta_ori is None else self.beta_ori
        return recon + beta * kl_iso + beta_ori * kl_ori, recon, kl_iso + kl_ori

    def loss(self, x, beta):
        """The β-VAE loss of Eq. 5, batch means: dict(loss, recon, kl)."""
        self._check_images(x)
        loss, recon, kl = self._terms(x, beta, *self.encode(x))
        return dict(loss=loss.mean(), recon=recon.mean(), kl=kl.mean())

    def pair_loss(self, x1, x2, beta):
        """Ada-GVAE loss on pairs (Locatello et al. 2020) with ada_gvae_average over z_ISO and z_ORI units:
        ½(R1 + R2) + ½(β_ISO·(KL_ISO(q̃1) + KL_ISO(q̃2)) + β_ORI·(KL_ORI(q̃1) + KL_ORI(q̃2))), batch means."""
        self._check_images(x1, x2)
        b, x = x1.shape[0], torch.cat([x1, x2])
        mu, logvar, log_q = self.encode(x)  # one pass: batch statistics over both images of every pair
        q1, q2, _ = ada_gvae_average(mu[:b], logvar[:b], log_q[:b], mu[b:], logvar[b:], log_q[b:])
        q = [torch.cat(pair) for pair in zip(q1, q2)]  # decode q̃1 and q̃2 (independent draws) in one pass
        loss, recon, kl = self._terms(x, beta, *q)  # per image; pair mean = ½(image 1 + image 2)
        half = lambda t: 0.5 * (t[:b] + t[b:]).mean()
        return dict(loss=half(loss), recon=half(recon), kl=half(kl))

    # representation --------------------------------------------------------------------------
    def representation(self, x):
        """Deterministic code (B, n_iso + 2·n_ori): μ_ISO, then (cos θ̄, sin θ̄) per z_ORI with θ̄ the
        circular mean arg Σ_i Q_i e^{iθ_i} of its pmf. Call model.eval() first (batch norm)."""
        self._check_images(x)
        mu, _, log_q = self.encode(x)
        angles = torch.arange(self.n_angles, dtype=mu.dtype, device=mu.device) * (TWO_PI / self.n_angles)
        q = log_q.exp()
        mean_angle = torch.atan2((q * angles.sin()).sum(-1), (q * angles.cos()).sum(-1))
        ori = torch.stack([mean_angle.cos(), mean_angle.sin()], dim=-1).flatten(1)
        return torch.cat([mu, ori], dim=1)
