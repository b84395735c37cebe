"""An independent, deliberately naive DiP written straight from the released design (docs/dip.md, "The
trunk" and "The Patch Detailer Head") with the released checkpoint's parameter names: F.unfold / F.fold
patches, complex-number RoPE built angle by angle, attention written out with softmax, RMSNorm by hand.
Tests load converted weights into it and require our model to compute the same function."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RefRMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf / torch.sqrt((xf * xf).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.weight


class RefAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RefRMSNorm(dim // heads)
        self.k_norm = RefRMSNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, freqs_cis):
        B, N, D = x.shape
        hd = D // self.heads
        qkv = self.qkv(x).view(B, N, 3, self.heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, N, H, hd)
        q, k = self.q_norm(q), self.k_norm(k)

        def rot(t):
            tc = torch.view_as_complex(t.float().reshape(B, N, self.heads, hd // 2, 2))
            return torch.view_as_real(tc * freqs_cis[None, :, None, :]).reshape(B, N, self.heads, hd).to(t.dtype)

        q, k = rot(q), rot(k)
        q, k, v = (z.permute(0, 2, 1, 3) for z in (q, k, v))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        return self.proj((att @ v).permute(0, 2, 1, 3).reshape(B, N, D))


class RefMLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class RefBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1 = RefRMSNorm(dim)
        self.attn = RefAttention(dim, heads)
        self.norm2 = RefRMSNorm(dim)
        self.mlp = RefMLP(dim, int(2 * 4 * dim / 3))
        self.adaLN_modulation = nn.Sequential(nn.Linear(dim, 6 * dim))

    def forward(self, x, c, freqs_cis):
        m = self.adaLN_modulation(c)
        sh1, sc1, g1, sh2, sc2, g2 = [m[..., i * x.shape[-1]:(i + 1) * x.shape[-1]] for i in range(6)]
        x = x + g1 * self.attn(self.norm1(x) * (1 + sc1) + sh1, freqs_cis)
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)


def conv_block(i, o, k):
    return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2), nn.SiLU())


class RefDecoder(nn.Module):
    def __init__(self, dim, base=64):
        super().__init__()
        a, b, c, d = base, 2 * base, 4 * base, 8 * base
        self.enc1, self.enc2 = conv_block(3, a, 3), conv_block(a, b, 3)
        self.enc3, self.enc4 = conv_block(b, c, 3), conv_block(c, d, 3)
        self.bottleneck = conv_block(d + dim, d, 1)
        self.up4, self.dec4 = nn.ConvTranspose2d(d, d, 2, 2), conv_block(2 * d, c, 3)
        self.up3, self.dec3 = nn.ConvTranspose2d(c, c, 2, 2), conv_block(2 * c, b, 3)
        self.up2, self.dec2 = nn.ConvTranspose2d(b, b, 2, 2), conv_block(2 * b, a, 3)
        self.up1, self.dec1 = nn.ConvTranspose2d(a, a, 2, 2), conv_block(2 * a, a, 3)
        self.out_conv = nn.Conv2d(a, 3, 1)

    def forward(self, px, s):
        e1 = self.enc1(px)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        e3 = self.enc3(F.max_pool2d(e2, 2))
        e4 = self.enc4(F.max_pool2d(e3, 2))
        p = F.max_pool2d(e4, 2)
        z = self.bottleneck(torch.cat([p, s[:, :, None, None].expand(-1, -1, *p.shape[-2:])], 1))
        z = self.dec4(torch.cat([self.up4(z), e4], 1))
        z = self.dec3(torch.cat([self.up3(z), e3], 1))
        z = self.dec2(torch.cat([self.up2(z), e2], 1))
        z = self.dec1(torch.cat([self.up1(z), e1], 1))
        return self.out_conv(z)


class RefDiP(nn.Module):
    def __init__(self, depth, dim, heads, patch, num_classes, base=64):
        super().__init__()
        self.patch, self.heads = patch, heads
        self.s_embedder = nn.Module()
        self.s_embedder.proj = nn.Linear(3 * patch * patch, dim)
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, dim)
        self.blocks = nn.ModuleList([RefBlock(dim, heads) for _ in range(depth)])
        self.local_decoder = RefDecoder(dim, base)

    def freqs_cis(self, h, w, hd):
        f = [1.0 / 10000 ** (4 * j / hd) for j in range(hd // 4)]
        xs, ys = torch.linspace(0, 16, w), torch.linspace(0, 16, h)
        angles = torch.zeros(h * w, hd // 2)
        for k in range(h * w):
            r, c = divmod(k, w)
            for m in range(hd // 2):
                angles[k, m] = xs[c] * f[m // 2] if m % 2 == 0 else ys[r] * f[(m - 1) // 2]
        return torch.polar(torch.ones_like(angles), angles)

    def forward(self, x, t, y):
        B, _, H, W = x.shape
        P = self.patch
        h, w = H // P, W // P
        patches = F.unfold(x, P, stride=P).transpose(1, 2)  # (B, N, 3PP)
        tok = self.s_embedder.proj(patches)
        freqs = torch.exp(-math.log(10) * torch.arange(128, dtype=torch.float32) / 128)
        args = t[:, None].float() * freqs[None]
        t_emb = self.t_embedder.mlp(torch.cat([torch.cos(args), torch.sin(args)], -1))
        c = F.silu(t_emb + self.y_embedder.embedding_table(y))[:, None]
        fc = self.freqs_cis(h, w, tok.shape[-1] // self.heads)
        for blk in self.blocks:
            tok = blk(tok, c, fc)
        s = F.silu(t_emb[:, None] + tok)  # (B, N, D)
        px = patches.reshape(B * h * w, 3, P, P)
        out = self.local_decoder(px, s.reshape(B * h * w, -1)).reshape(B, h * w, 3 * P * P)
        return F.fold(out.transpose(1, 2), (H, W), P, stride=P)
