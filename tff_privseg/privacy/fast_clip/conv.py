"""Rule for Conv2D and Conv2DTranspose: ghost norm, or explicit per-example kernel gradients
(grouped backprop-filter, patches x einsum, or a per-example loop)."""

from __future__ import annotations

from collections.abc import Callable

import tensorflow as tf

from tff_privseg.privacy.fast_clip.base import (
    Contribution,
    LoopJob,
    Record,
    Rule,
    as_rows,
    layer_grad_clipped,
    sum_sq_rows,
)
from tff_privseg.privacy.fast_clip.linear import (
    activate,
    choose,
    ghost_sq_norm,
    onednn,
    static_positions,
    watched_pre_activation,
)


class _ConvRecord(Record):
    def __init__(self, layer, x, z, strategy, transpose):
        self.layer, self.x, self.z, self.strategy, self.transpose = layer, x, z, strategy, transpose

    def _params(self):
        layer = self.layer
        pad = layer.padding.upper()
        strides = [1, *layer.strides, 1]
        dil = [1, *layer.dilation_rate, 1]
        return pad, strides, dil

    def _patches_and_rows(self, dz):
        """(A [B,T,K], G [B,T,C]) with K ordered like the kernel's leading axes."""
        layer = self.layer
        pad, strides, dil = self._params()
        kh, kw = layer.kernel_size
        if self.transpose:
            # y = conv_transpose(x, W) is the adjoint of conv(., W): dW = Σ patches(dy) ⊗ x.
            src, other = dz, self.x
        else:
            src, other = self.x, dz
        patches = tf.image.extract_patches(src, [1, kh, kw, 1], strides, dil, pad)
        k = kh * kw * int(src.shape[-1])
        return as_rows(patches, k), as_rows(tf.cast(other, patches.dtype), int(other.shape[-1]))

    def contribute(self, dz: tf.Tensor, tape: tf.GradientTape) -> Contribution:
        layer = self.layer
        kernel = layer.kernel
        out = Contribution()
        bias = layer.bias if layer.use_bias else None
        if self.strategy == "ghost":
            a, g = self._patches_and_rows(dz)
            sq = ghost_sq_norm(a, g)
            if bias is not None:
                sq += sum_sq_rows(tf.reduce_sum(as_rows(dz, int(dz.shape[-1])), axis=1))
            out.sq_norm = sq
            out.clipped = layer_grad_clipped(tape, self.z, dz, layer.trainable_variables)
            return out
        if bias is not None:
            out.per_example.append((bias, tf.reduce_sum(as_rows(dz, int(dz.shape[-1])), axis=1)))
        if self.strategy == "einsum":
            a, g = self._patches_and_rows(dz)
            # [B, K, C]: (kh, kw, cin) x cout, or (kh, kw, filters) x cin for the transpose,
            # which is the kernel's layout in both cases.
            pe = tf.matmul(a, g, transpose_a=True)
            pe = tf.reshape(pe, tf.concat([[tf.shape(pe)[0]], kernel.shape], 0))
            out.per_example.append((kernel, pe))
            return out
        if self.strategy == "grouped":
            out.per_example.append((kernel, self._grouped(dz)))
            return out
        out.loop.append(LoopJob(kernel, (self.x, dz), self._one_example_fn()))
        return out

    def _grouped(self, dz: tf.Tensor) -> tf.Tensor:
        """Per-example kernel gradients [B, *kernel.shape] from ONE grouped
        Conv2DBackpropFilter: the batch folded into channel groups ([B,H,W,C] -> [1,H,W,B·C]),
        so group b only sees example b. No control flow, no patch copies."""
        layer = self.layer
        pad, strides, dil = self._params()
        kh, kw = layer.kernel_size
        src, other = (dz, self.x) if self.transpose else (self.x, dz)
        other = tf.cast(other, src.dtype)
        c_src, c_other = int(src.shape[-1]), int(other.shape[-1])
        batch = tf.shape(src)[0]

        def fold(t: tf.Tensor) -> tf.Tensor:
            s = tf.shape(t)
            return tf.reshape(tf.transpose(t, [1, 2, 0, 3]), [1, s[1], s[2], -1])

        g = tf.compat.v1.nn.conv2d_backprop_filter(
            fold(src),
            tf.stack([kh, kw, c_src, batch * c_other]),
            fold(other),
            strides,
            pad,
            dilations=dil,
        )
        g = tf.reshape(g, [kh, kw, c_src, batch, c_other])
        return tf.transpose(g, [3, 0, 1, 2, 4])

    def _one_example_fn(self) -> Callable[[tf.Tensor, tf.Tensor], tf.Tensor]:
        layer = self.layer
        pad, strides, dil = self._params()
        shape = layer.kernel.shape
        dilated = any(d != 1 for d in layer.dilation_rate)
        transpose = self.transpose

        if not dilated or onednn():

            def fn(x_i, dz_i):
                x_i, dz_i = x_i[None], tf.cast(dz_i[None], x_i.dtype)
                if transpose:
                    x_i, dz_i = dz_i, x_i
                return tf.compat.v1.nn.conv2d_backprop_filter(
                    x_i, shape, dz_i, strides, pad, dilations=dil
                )

            return fn

        # TF's Eigen CPU kernel has no dilated Conv2DBackpropFilter: differentiate the layer's
        # own (space-to-batch) convolution for one example instead.
        def fn_tape(x_i, dz_i):
            k = tf.convert_to_tensor(layer.kernel)
            with tf.GradientTape() as t:
                t.watch(k)
                if transpose:
                    out_shape = tf.concat([[1], tf.shape(dz_i)], 0)
                    z = tf.nn.conv2d_transpose(x_i[None], k, out_shape, strides, pad, dilations=dil)
                else:
                    z = layer.convolution_op(x_i[None], k)
            return t.gradient(z, k, output_gradients=tf.cast(dz_i[None], z.dtype))

        return fn_tape


class ConvRule(Rule):
    """Conv2D (strides, dilation, 'same'/'valid') and Conv2DTranspose, channels_last, groups 1."""

    def __init__(self, transpose: bool = False):
        self.transpose = transpose

    def supported(self, layer) -> bool:
        if getattr(layer, "data_format", "channels_last") != "channels_last":
            return False
        if getattr(layer, "groups", 1) != 1 or layer.padding not in ("same", "valid"):
            return False
        return not (self.transpose and layer.output_padding is not None)

    def forward(self, layer, args, kwargs, tape, strategy, explicit_only):
        x, z = watched_pre_activation(layer, args, kwargs, tape)
        kh, kw = layer.kernel_size
        if self.transpose:
            k, c, positions = kh * kw * layer.filters, int(x.shape[-1]), static_positions(x)
        else:
            k, c, positions = kh * kw * int(x.shape[-1]), layer.filters, static_positions(z)
        s = choose(strategy, positions, k, c)
        if explicit_only and s == "ghost":
            s = choose("auto", None, k, c)
        return activate(layer, z), _ConvRecord(layer, x, z, s, self.transpose)
