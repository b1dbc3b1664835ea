//! Methods for backpropagation of gradients.
use crate::op::{BinaryOp, Op, ReduceOp, UnaryOp};
use crate::{Error, Result, Tensor, TensorId};
use std::collections::{hash_map::Entry, HashMap};

// arg has been reduced to node via reduce_dims, expand it back to arg.
// This has to handle keepdims.
fn broadcast_back(arg: &Tensor, node: &Tensor, reduced_dims: &[usize]) -> Result<Tensor> {
    if arg.rank() == node.rank() {
        // keepdim = true
        node.broadcast_as(arg.shape())
    } else {
        // keepdim = false
        // first expand the reduced dims.
        node.reshape(reduced_dims)?.broadcast_as(arg.shape())
    }
}

thread_local! {
    static CANDLE_GRAD_DO_NOT_DETACH: bool = {
        match std::env::var("CANDLE_GRAD_DO_NOT_DETACH") {
            Ok(s) => {
                !s.is_empty() && s != "0"
            },
            Err(_) => false,
        }
    }
}

impl Tensor {
    /// Return all the nodes that lead to this value in a topologically sorted vec, the first
    /// elements having dependencies on the latter ones, e.g. the first element if any is the
    /// argument.
    /// This assumes that the op graph is a DAG.
    pub fn sorted_nodes(&self) -> Vec<&Tensor> {
        // The vec of sorted nodes is passed as an owned value rather than a mutable reference
        // to get around some lifetime limitations.
        fn walk<'a>(
            node: &'a Tensor,
            nodes: Vec<&'a Tensor>,
            already_seen: &mut HashMap<TensorId, bool>,
        ) -> (bool, Vec<&'a Tensor>) {
            if let Some(&tg) = already_seen.get(&node.id()) {
                return (tg, nodes);
            }
            let mut track_grad = false;
            let mut nodes = if node.is_variable() {
                // Do not call recursively on the "leaf" nodes.
                track_grad = true;
                nodes
            } else if node.dtype().is_int() {
                nodes
            } else if let Some(op) = node.op() {
                match op {
                    Op::IndexAdd(t1, t2, t3, _)
                    | Op::Scatter(t1, t2, t3, _)
                    | Op::ScatterAdd(t1, t2, t3, _)
                    | Op::CustomOp3(t1, t2, t3, _)
                    | Op::WhereCond(t1, t2, t3) => {
                        let (tg, nodes) = walk(t1, nodes, already_seen);
                        track_grad |= tg;
                        let (tg, nodes) = walk(t2, nodes, already_seen);
                        track_grad |= tg;
                        let (tg, nodes) = walk(t3, nodes, already_seen);
                        track_grad |= tg;
                        nodes
                    }
                    Op::Conv1D {
                        arg: lhs,
                        kernel: rhs,
                        ..
                    }
                    | Op::ConvTranspose1D {
                        arg: lhs,
                        kernel: rhs,
                        ..
                    }
                    | Op::Conv2D {
                        arg: lhs,
                        kernel: rhs,
                        ..
                    }
                    | Op::ConvTranspose2D {
                        arg: lhs,
                        kernel: rhs,
                        ..
                    }
                    | Op::CustomOp2(lhs, rhs, _)
                    | Op::Binary(lhs, rhs, _)
                    | Op::Gather(lhs, rhs, _)
                    | Op::IndexSelect(lhs, rhs, _)
                    | Op::Matmul(lhs, rhs)
                    | Op::SliceScatter0(lhs, rhs, _) => {
                        let (tg, nodes) = walk(lhs, nodes, already_seen);
                        track_grad |= tg;
                        let (tg, nodes) = walk(rhs, nodes, already_seen);
                        track_grad |= tg;
                        nodes
                    }
                    Op::Cat(args, _) => args.iter().fold(nodes, |nodes, arg| {
                        let (tg, nodes) = walk(arg, nodes, already_seen);
                        track_grad |= tg;
                        nodes
                    }),
                    Op::Affine { arg, mul, .. } => {
                        if *mul == 0. {
                            nodes
                        } else {
                            let (tg, nodes) = walk(arg, nodes, already_seen);
                            track_grad |= tg;
                            nodes
                        }
                    }
                    Op::Unary(_node, UnaryOp::Ceil)
                    | Op::Unary(_node, UnaryOp::Floor)
                    | Op::Unary(_node, UnaryOp::Round)
                    | Op::Unary(_node, UnaryOp::Sign) => nodes,
                    Op::Reshape(node)
                    | Op::UpsampleNearest1D { arg: node, .. }
                    | Op::UpsampleNearest2D { arg: node, .. }
                    | Op::UpsampleBilinear2D { arg: node, .. }
                    | Op::AvgPool2D { arg: node, .. }
                    | Op::MaxPool2D { arg: node, .. }
                    | Op::Copy(node)
                    | Op::Broadcast(node)
                    | Op::Cmp(node, _)
                    | Op::Reduce(node, ReduceOp::Min | ReduceOp::Sum | ReduceOp::Max, _)
                    | Op::ToDevice(node)
                    | Op::Transpose(node, _, _)
                    | Op::Permute(node, _)
                    | Op::Narrow(node, _, _, _)
                    | Op::Unary(node, _)
                    | Op::Elu(node, _)
                    | Op::Powf(node, _)
                    | Op::CustomOp1(node, _) => {
                        let (tg, nodes) = walk(node, nodes, already_seen);
                        track_grad |= tg;
                        nodes
                    }
                    Op::ToDType(node) => {
                        if node.dtype().is_float() {
                            let (tg, nodes) = walk(node, nodes, already_seen);
                            track_grad |= tg;
                            nodes
                        } else {
                            nodes
                        }
                    }
                    Op::Reduce(_, ReduceOp::ArgMin | ReduceOp::ArgMax, _) => nodes,
                }
            } else {
                nodes
            };
            already_seen.insert(node.id(), track_grad);
            if track_grad {
                nodes.push(node);
            }
            (track_grad, nodes)
        }
        let (_tg, mut nodes) = walk(self, vec![], &mut HashMap::new());
        nodes.reverse();
        nodes
    }

    pub fn backward(&self) -> Result<GradStore> {
        let sorted_nodes = self.sorted_nodes();
        // Patched for Safety Inspector (see vendor/README.md): only the nodes in `sorted_nodes`
        // lead to a variable, so gradients are computed for those alone. Upstream computes a
        // gradient for every input of every op (the frozen weights of a LoRA layer, rotary
        // tables, masks) and accumulates each one into a fresh zero tensor.
        let tracked: std::collections::HashSet<TensorId> =
            sorted_nodes.iter().map(|n| n.id()).collect();
        let mut grads = GradStore::new();
        grads.insert(self, self.ones_like()?.contiguous()?);
        // Adds the gradient `$g` to `$arg`'s, evaluating `$g` only when `$arg` needs one.
        macro_rules! acc {
            ($arg:expr, $g:expr) => {{
                let arg: &Tensor = $arg;
                if tracked.contains(&arg.id()) {
                    let g: Tensor = $g;
                    grads.accumulate(arg, g)?;
                }
            }};
        }
        macro_rules! needs {
            ($arg:expr) => {
                tracked.contains(&$arg.id())
            };
        }
        for node in sorted_nodes.iter() {
            if node.is_variable() {
                continue;
            }
            let grad = grads
                .remove(node)
                .expect("candle internal error - grad not populated");
            // https://github.com/huggingface/candle/issues/1241
            // Ideally, we would make these operations in place where possible to ensure that we
            // do not have to allocate too often. Here we just call `.detach` to avoid computing
            // the backprop graph of the backprop itself. This would be an issue for second order
            // derivatives but these are out of scope at the moment.
            let do_not_detach = CANDLE_GRAD_DO_NOT_DETACH.with(|b| *b);
            let grad = if do_not_detach { grad } else { grad.detach() };
            if let Some(op) = node.op() {
                match op {
                    Op::Binary(lhs, rhs, BinaryOp::Add) => {
                        acc!(lhs, grad.clone());
                        acc!(rhs, grad.clone());
                    }
                    Op::Binary(lhs, rhs, BinaryOp::Sub) => {
                        acc!(lhs, grad.clone());
                        acc!(rhs, grad.neg()?);
                    }
                    Op::Binary(lhs, rhs, BinaryOp::Mul) => {
                        acc!(lhs, grad.mul(rhs)?);
                        acc!(rhs, grad.mul(lhs)?);
                    }
                    Op::Binary(lhs, rhs, BinaryOp::Div) => {
                        acc!(lhs, grad.div(rhs)?);
                        acc!(rhs, grad.mul(lhs)?.div(&rhs.sqr()?)?.neg()?);
                    }
                    Op::Binary(lhs, rhs, BinaryOp::Minimum)
                    | Op::Binary(lhs, rhs, BinaryOp::Maximum) => {
                        let mask_lhs = node.eq(lhs)?.to_dtype(grad.dtype())?;
                        let mask_rhs = node.eq(rhs)?.to_dtype(grad.dtype())?;
                        // If both masks are 1 one the same point, we want to scale the
                        // gradient by 0.5 rather than 1.
                        acc!(lhs, mask_lhs.mul(&grad)?.div(&(&mask_rhs + 1.)?)?);
                        acc!(rhs, mask_rhs.mul(&grad)?.div(&(&mask_lhs + 1.)?)?);
                    }
                    Op::WhereCond(pred, t, f) => {
                        let zeros = grad.zeros_like()?;
                        acc!(t, pred.where_cond(&grad, &zeros)?);
                        acc!(f, pred.where_cond(&zeros, &grad)?);
                    }
                    Op::Conv1D {
                        arg,
                        kernel,
                        padding,
                        stride,
                        dilation,
                    } => {
                        // The output height for conv_transpose1d is:
                        // (l_in - 1) * stride - 2 * padding + dilation * (k_size - 1) + out_padding + 1
                        acc!(arg, {
                            let grad_l_in = grad.dim(2)?;
                            let k_size = kernel.dim(2)?;
                            let out_size = (grad_l_in - 1) * stride + dilation * (k_size - 1) + 1
                                - 2 * padding;
                            let out_padding = arg.dim(2)? - out_size;
                            grad.conv_transpose1d(
                                kernel,
                                *padding,
                                out_padding,
                                *stride,
                                *dilation,
                                /* groups */ 1,
                            )?
                        });
                        acc!(kernel, {
                            let grad_kernel = arg
                                .transpose(0, 1)?
                                .conv1d(&grad.transpose(0, 1)?, *padding, *dilation, *stride, 1)?
                                .transpose(0, 1)?;
                            let (_, _, k0) = kernel.dims3()?;
                            let (_, _, g_k0) = grad_kernel.dims3()?;
                            if g_k0 != k0 {
                                grad_kernel.narrow(2, 0, k0)?
                            } else {
                                grad_kernel
                            }
                        });
                    }
                    Op::Conv2D {
                        arg,
                        kernel,
                        padding,
                        stride,
                        dilation,
                    } => {
                        // The output height for conv_transpose2d is:
                        // (i_h - 1) * stride - 2 * padding + dilation * (k_h - 1) + out_padding + 1
                        acc!(arg, {
                            let grad_h = grad.dim(2)?;
                            let k_h = kernel.dim(2)?;
                            let out_size =
                                (grad_h - 1) * stride + dilation * (k_h - 1) + 1 - 2 * padding;
                            let out_padding = arg.dim(2)? - out_size;
                            grad.conv_transpose2d(
                                kernel,
                                *padding,
                                out_padding,
                                *stride,
                                *dilation,
                            )?
                        });
                        acc!(kernel, {
                            let grad_kernel = arg
                                .transpose(0, 1)?
                                .conv2d(&grad.transpose(0, 1)?, *padding, *dilation, *stride, 1)?
                                .transpose(0, 1)?;
                            let (_, _, k0, k1) = kernel.dims4()?;
                            let (_, _, g_k0, g_k1) = grad_kernel.dims4()?;
                            if g_k0 != k0 || g_k1 != k1 {
                                grad_kernel.narrow(2, 0, k0)?.narrow(3, 0, k1)?
                            } else {
                                grad_kernel
                            }
                        });
                    }
                    Op::ConvTranspose1D { .. } => Err(Error::BackwardNotSupported {
                        op: "conv-transpose1d",
                    })?,
                    Op::ConvTranspose2D {
                        arg,
                        kernel,
                        padding,
                        stride,
                        dilation,
                        output_padding: _output_padding,
                    } => {
                        acc!(arg, grad.conv2d(kernel, *padding, *stride, *dilation, 1)?);
                        acc!(kernel, {
                            let grad_kernel = grad
                                .transpose(0, 1)?
                                .conv2d(&arg.transpose(0, 1)?, *padding, *dilation, *stride, 1)?
                                .transpose(0, 1)?;
                            let (_, _, k0, k1) = kernel.dims4()?;
                            let (_, _, g_k0, g_k1) = grad_kernel.dims4()?;
                            if g_k0 != k0 || g_k1 != k1 {
                                grad_kernel.narrow(2, 0, k0)?.narrow(3, 0, k1)?
                            } else {
                                grad_kernel
                            }
                        });
                    }
                    Op::AvgPool2D {
                        arg,
                        kernel_size,
                        stride,
                    } => {
                        if kernel_size != stride {
                            crate::bail!("backward not supported for avgpool2d if ksize {kernel_size:?} != stride {stride:?}")
                        }
                        acc!(arg, {
                            let (_n, _c, h, w) = arg.dims4()?;
                            let grad_arg = grad.upsample_nearest2d(h, w)?;
                            (grad_arg * (1f64 / (kernel_size.0 * kernel_size.1) as f64))?
                        });
                    }
                    Op::MaxPool2D {
                        arg,
                        kernel_size,
                        stride,
                    } => {
                        if kernel_size != stride {
                            crate::bail!("backward not supported for maxpool2d if ksize {kernel_size:?} != stride {stride:?}")
                        }
                        acc!(arg, {
                            let (_n, _c, h, w) = arg.dims4()?;
                            // For computing the max-pool gradient, we compute a mask where a 1
                            // means that the element is the maximum, then we apply this mask to
                            // the upsampled gradient (taking into account that multiple max may
                            // exist so we scale the gradient for this case).
                            let node_upsampled = node.upsample_nearest2d(h, w)?;
                            let mask = arg.eq(&node_upsampled)?.to_dtype(arg.dtype())?;
                            let avg = mask.avg_pool2d_with_stride(*kernel_size, *stride)?;
                            ((&grad * avg)?.upsample_nearest2d(h, w)? * mask)?
                        });
                    }
                    Op::UpsampleNearest1D { arg, target_size } => {
                        let (_n, c, size) = arg.dims3()?;
                        if target_size % size != 0 {
                            crate::bail!("backward not supported for non integer upscaling factors")
                        }
                        let scale = target_size / size;
                        acc!(arg, {
                            let kernel = Tensor::ones((c, 1, scale), arg.dtype(), arg.device())?;
                            grad.conv1d(&kernel, 0, scale, 1, c)?
                        });
                    }
                    Op::UpsampleNearest2D {
                        arg,
                        target_h,
                        target_w,
                    } => {
                        let (_n, c, h, w) = arg.dims4()?;
                        if target_h % h != 0 || target_w % w != 0 {
                            crate::bail!("backward not supported for non integer upscaling factors")
                        }
                        let scale_h = target_h / h;
                        let scale_w = target_w / w;

                        if scale_h != scale_w {
                            crate::bail!("backward not supported for non uniform upscaling factors")
                        };
                        acc!(arg, {
                            let kernel =
                                Tensor::ones((c, 1, scale_h, scale_w), arg.dtype(), arg.device())?;
                            grad.conv2d(&kernel, 0, scale_h, 1, c)?
                        });
                    }
                    Op::UpsampleBilinear2D { .. } => {
                        crate::bail!("backward not supported for upsample_bilinear2d")
                    }
                    Op::SliceScatter0(lhs, rhs, start_rhs) => {
                        acc!(rhs, grad.narrow(0, *start_rhs, rhs.dim(0)?)?);
                        acc!(lhs, grad.slice_scatter0(&rhs.zeros_like()?, *start_rhs)?);
                    }
                    Op::Gather(arg, indexes, dim) => {
                        if needs!(arg) {
                            let sum_grad = grads.or_insert(arg)?;
                            *sum_grad = sum_grad.scatter_add(indexes, &grad, *dim)?;
                        }
                    }
                    Op::Scatter(init, indexes, src, dim) => {
                        acc!(init, grad.clone());
                        acc!(src, grad.gather(indexes, *dim)?);
                    }
                    Op::ScatterAdd(init, indexes, src, dim) => {
                        acc!(init, {
                            let mask = init.ones_like()?;
                            let mask = mask.scatter(indexes, &mask.zeros_like()?, *dim)?;
                            grad.mul(&mask)?
                        });
                        acc!(src, grad.gather(indexes, *dim)?);
                    }
                    Op::IndexAdd(init, indexes, src, dim) => {
                        acc!(init, grad.clone());
                        acc!(src, grad.index_select(indexes, *dim)?);
                    }
                    Op::IndexSelect(arg, indexes, dim) => {
                        if needs!(arg) {
                            let sum_grad = grads.or_insert(arg)?;
                            // index_select accepts strided ids but index_add requires contiguous ones.
                            let indexes = indexes.contiguous()?;
                            *sum_grad = sum_grad.index_add(&indexes, &grad, *dim)?;
                        }
                    }
                    Op::Matmul(lhs, rhs) => {
                        // Skipping checks, the op went ok, we can skip
                        // the matmul size checks for now.
                        acc!(lhs, grad.matmul(&rhs.t()?)?);
                        acc!(rhs, lhs.t()?.matmul(&grad)?);
                    }
                    Op::Cat(args, dim) => {
                        let mut start_idx = 0;
                        for arg in args {
                            let len = arg.dims()[*dim];
                            acc!(arg, grad.narrow(*dim, start_idx, len)?);
                            start_idx += len;
                        }
                    }
                    Op::Broadcast(arg) => {
                        acc!(arg, {
                            let arg_dims = arg.dims();
                            let node_dims = node.dims();
                            // The number of dims that have been inserted on the left.
                            let left_dims = node_dims.len() - arg_dims.len();
                            let mut sum_dims: Vec<usize> = (0..left_dims).collect();
                            for (dim, (node_dim, arg_dim)) in node_dims[left_dims..]
                                .iter()
                                .zip(arg_dims.iter())
                                .enumerate()
                            {
                                if node_dim != arg_dim {
                                    sum_dims.push(dim + left_dims)
                                }
                            }
                            let mut arg_grad = grad.sum_keepdim(sum_dims.as_slice())?;
                            for _i in 0..left_dims {
                                arg_grad = arg_grad.squeeze(0)?
                            }
                            arg_grad.broadcast_as(arg_dims)?
                        });
                    }
                    Op::Reduce(arg, ReduceOp::Sum, reduced_dims) => {
                        acc!(arg, broadcast_back(arg, &grad, reduced_dims)?);
                    }
                    Op::Reduce(arg, ReduceOp::Max | ReduceOp::Min, reduced_dims) => {
                        acc!(arg, {
                            let node = broadcast_back(arg, node, reduced_dims)?;
                            let grad = broadcast_back(arg, &grad, reduced_dims)?;
                            let grad = node.eq(arg)?.to_dtype(grad.dtype())?.mul(&grad)?;
                            grad.broadcast_as(arg.dims())?
                        });
                    }
                    Op::ToDType(arg) => acc!(arg, grad.to_dtype(arg.dtype())?),
                    Op::Copy(arg) => acc!(arg, grad.clone()),
                    Op::Affine { arg, mul, .. } => acc!(arg, grad.affine(*mul, 0.)?),
                    Op::Unary(arg, UnaryOp::Log) => acc!(arg, (&grad / arg)?),
                    Op::Unary(arg, UnaryOp::Sin) => acc!(arg, (&grad * arg.cos())?),
                    Op::Unary(arg, UnaryOp::Cos) => acc!(arg, (&grad * arg.sin())?.neg()?),
                    Op::Unary(arg, UnaryOp::Tanh) => acc!(arg, {
                        let minus_dtanh = (node.sqr()? - 1.)?;
                        (&grad * &minus_dtanh)?.neg()?
                    }),
                    Op::Unary(arg, UnaryOp::Abs) => acc!(arg, {
                        let ones = arg.ones_like()?;
                        let abs_grad = arg.ge(&arg.zeros_like()?)?.where_cond(&ones, &ones.neg()?);
                        (&grad * abs_grad)?
                    }),
                    Op::Unary(arg, UnaryOp::Exp) => acc!(arg, (&grad * *node)?),
                    Op::Unary(arg, UnaryOp::Neg) => acc!(arg, grad.neg()?),
                    Op::Unary(arg, UnaryOp::Recip) => acc!(arg, (&grad / arg.sqr()?)?.neg()?),
                    &Op::Narrow(ref arg, dim, start_idx, len) => acc!(arg, {
                        let arg_dims = arg.dims();
                        let left_pad = if start_idx == 0 {
                            None
                        } else {
                            let mut dims = arg_dims.to_vec();
                            dims[dim] = start_idx;
                            Some(Tensor::zeros(dims, grad.dtype(), grad.device())?)
                        };
                        let right_pad = arg_dims[dim] - start_idx - len;
                        let right_pad = if right_pad == 0 {
                            None
                        } else {
                            let mut dims = arg_dims.to_vec();
                            dims[dim] = right_pad;
                            Some(Tensor::zeros(dims, grad.dtype(), grad.device())?)
                        };
                        match (left_pad, right_pad) {
                            (None, None) => grad.clone(),
                            (Some(l), None) => Tensor::cat(&[&l, &grad], dim)?,
                            (None, Some(r)) => Tensor::cat(&[&grad, &r], dim)?,
                            (Some(l), Some(r)) => Tensor::cat(&[&l, &grad, &r], dim)?,
                        }
                    }),
                    Op::Unary(_, UnaryOp::Floor)
                    | Op::Unary(_, UnaryOp::Round)
                    | Op::Reduce(_, ReduceOp::ArgMin, _)
                    | Op::Reduce(_, ReduceOp::ArgMax, _)
                    | Op::Unary(_, UnaryOp::Sign)
                    | Op::Cmp(_, _) => {}
                    Op::Reshape(arg) => acc!(arg, grad.reshape(arg.dims())?),
                    Op::Unary(_, UnaryOp::Ceil) => Err(Error::BackwardNotSupported { op: "ceil" })?,
                    Op::Unary(arg, UnaryOp::Gelu) => acc!(arg, {
                        let cube = arg.powf(3.)?;
                        let tanh = (0.0356774 * &cube + (0.797885 * arg)?)?.tanh()?;
                        let gelu_grad = (((0.5 * &tanh)?
                            + (0.0535161 * cube + (0.398942 * arg)?)? * (1. - tanh.powf(2.)?))?
                            + 0.5)?;
                        (&grad * gelu_grad)?
                    }),
                    Op::Unary(arg, UnaryOp::Erf) => acc!(arg, {
                        // d/dx erf(x) = 2/sqrt(pi) * e^(-x^2)
                        let erf_grad =
                            (2. / std::f64::consts::PI.sqrt()) * (arg.sqr()?.neg()?).exp()?;
                        (&grad * erf_grad)?
                    }),
                    Op::Unary(arg, UnaryOp::GeluErf) => acc!(arg, {
                        // d/dx gelu_erf(x) = 0.5 + 0.398942 e^(-x^2/2) x + 0.5 erf(x/sqrt(2))
                        let neg_half_square = (arg.sqr()?.neg()? / 2.)?;
                        let scaled_exp_arg = (0.398942 * neg_half_square.exp()? * arg)?;
                        let arg_scaled_sqrt = (arg / 2f64.sqrt())?;
                        let erf_scaled_sqrt = (0.5 * arg_scaled_sqrt.erf()?)?;
                        let gelu_erf_grad = (0.5 + scaled_exp_arg + erf_scaled_sqrt)?;
                        (&grad * gelu_erf_grad)?
                    }),
                    Op::Unary(arg, UnaryOp::Relu) => acc!(arg, {
                        let relu_grad = arg.ge(&arg.zeros_like()?)?.to_dtype(arg.dtype())?;
                        (&grad * relu_grad)?
                    }),
                    Op::Unary(arg, UnaryOp::Silu) => acc!(arg, {
                        // d/dx silu = sigmoid(x) * (1 + x * (1 - sigmoid(x))) = sigmoid(x) * (1 - node) + node
                        let sigmoid_arg = (arg.neg()?.exp()? + 1.)?.recip()?;
                        let silu_grad = &sigmoid_arg * (1. - *node) + *node;
                        (&grad * silu_grad)?
                    }),
                    Op::Elu(arg, alpha) => acc!(arg, {
                        // d/dx elu(x) = 1 for x > 0, alpha * e^x for x <= 0
                        let zeros = arg.zeros_like()?;
                        let positive_mask = arg.gt(&zeros)?.to_dtype(arg.dtype())?;
                        let negative_mask = arg.le(&zeros)?.to_dtype(arg.dtype())?;
                        // node == alpha * (e^x - 1) for x <= 0, reuse it
                        let negative_exp_mask = (negative_mask * (*node + *alpha))?;
                        let combined_mask = (positive_mask + negative_exp_mask)?;
                        (&grad * combined_mask)?
                    }),
                    Op::Powf(arg, e) => acc!(arg, (&(&grad * arg.powf(e - 1.)?)? * *e)?),
                    Op::CustomOp1(arg, c) => {
                        if needs!(arg) {
                            if let Some(arg_grad) = c.bwd(arg, node, &grad)? {
                                grads.accumulate(arg, arg_grad)?;
                            }
                        }
                    }
                    Op::CustomOp2(arg1, arg2, c) => {
                        if needs!(arg1) || needs!(arg2) {
                            let (arg_grad1, arg_grad2) = c.bwd(arg1, arg2, node, &grad)?;
                            if let Some(g) = arg_grad1.filter(|_| needs!(arg1)) {
                                grads.accumulate(arg1, g)?;
                            }
                            if let Some(g) = arg_grad2.filter(|_| needs!(arg2)) {
                                grads.accumulate(arg2, g)?;
                            }
                        }
                    }
                    Op::CustomOp3(arg1, arg2, arg3, c) => {
                        if needs!(arg1) || needs!(arg2) || needs!(arg3) {
                            let (arg_grad1, arg_grad2, arg_grad3) =
                                c.bwd(arg1, arg2, arg3, node, &grad)?;
                            if let Some(g) = arg_grad1.filter(|_| needs!(arg1)) {
                                grads.accumulate(arg1, g)?;
                            }
                            if let Some(g) = arg_grad2.filter(|_| needs!(arg2)) {
                                grads.accumulate(arg2, g)?;
                            }
                            if let Some(g) = arg_grad3.filter(|_| needs!(arg3)) {
                                grads.accumulate(arg3, g)?;
                            }
                        }
                    }
                    Op::Unary(arg, UnaryOp::Sqr) => acc!(arg, arg.mul(&grad)?.affine(2., 0.)?),
                    Op::Unary(arg, UnaryOp::Sqrt) => acc!(arg, grad.div(node)?.affine(0.5, 0.)?),
                    Op::ToDevice(arg) => acc!(arg, grad.to_device(arg.device())?),
                    Op::Transpose(arg, dim1, dim2) => acc!(arg, grad.transpose(*dim1, *dim2)?),
                    Op::Permute(arg, dims) => acc!(arg, {
                        let mut inv_dims = vec![0; dims.len()];
                        for (i, &dim_idx) in dims.iter().enumerate() {
                            inv_dims[dim_idx] = i
                        }
                        grad.permute(inv_dims)?
                    }),
                };
            }
        }
        Ok(grads)
    }
}

/// A store for gradients, associating a tensor id to the corresponding gradient tensor, used for back propagation.
#[derive(Default, Debug)]
pub struct GradStore(HashMap<TensorId, Tensor>);

impl GradStore {
    /// Create a new gradient store
    fn new() -> Self {
        Self::default()
    }

    /// Get the gradient tensor corresponding to the given tensor id
    pub fn get_id(&self, id: TensorId) -> Option<&Tensor> {
        self.0.get(&id)
    }

    /// Get the gradient tensor associated with the given tensor
    pub fn get(&self, tensor: &Tensor) -> Option<&Tensor> {
        self.0.get(&tensor.id())
    }

    /// Remove the gradient tensor associated with the given tensor, returning it if it exists
    pub fn remove(&mut self, tensor: &Tensor) -> Option<Tensor> {
        self.0.remove(&tensor.id())
    }

    /// Insert a gradient tensor associated with the given tensor, returning the previous gradient tensor if it existed
    pub fn insert(&mut self, tensor: &Tensor, grad: Tensor) -> Option<Tensor> {
        self.0.insert(tensor.id(), grad)
    }

    /// Insert a gradient tensor associated with the given tensor id, returning the previous gradient tensor if it existed
    pub fn insert_id(&mut self, id: TensorId, grad: Tensor) -> Option<Tensor> {
        self.0.insert(id, grad)
    }

    /// Get the gradient tensor associated with the given tensor, or, if it does not exist,
    /// insert a tensor of zeroes, with the same shape and type as the given tensors and return it
    fn or_insert(&mut self, tensor: &Tensor) -> Result<&mut Tensor> {
        let grad = match self.0.entry(tensor.id()) {
            Entry::Occupied(entry) => entry.into_mut(),
            Entry::Vacant(entry) => {
                let grad = tensor.zeros_like()?;
                entry.insert(grad)
            }
        };
        Ok(grad)
    }

    /// Adds `grad` to the gradient of `tensor`. The first contribution is stored as it is
    /// (made contiguous) instead of being added to a fresh tensor of zeros.
    fn accumulate(&mut self, tensor: &Tensor, grad: Tensor) -> Result<()> {
        match self.0.entry(tensor.id()) {
            Entry::Occupied(mut entry) => {
                let sum = entry.get().add(&grad)?;
                *entry.get_mut() = sum;
            }
            Entry::Vacant(entry) => {
                let grad = if grad.dtype() != tensor.dtype() {
                    grad.to_dtype(tensor.dtype())?
                } else {
                    grad
                };
                entry.insert(grad.contiguous()?);
            }
        }
        Ok(())
    }

    /// Extend this gradient store with the contents of another.
    /// If an entry is already occupied, updates and ensures new tensor follows correct detach semantics.
    /// Otherwise simply inserts.
    pub fn extend(&mut self, other: Self) -> Result<()> {
        for (id, grad) in other.0 {
            match self.0.entry(id) {
                Entry::Occupied(mut entry) => {
                    let new_grad = entry.get().add(&grad)?;

                    let do_not_detach = CANDLE_GRAD_DO_NOT_DETACH.with(|b| *b);
                    let new_grad = if do_not_detach {
                        new_grad
                    } else {
                        new_grad.detach()
                    };

                    *entry.get_mut() = new_grad;
                }
                Entry::Vacant(entry) => {
                    entry.insert(grad);
                }
            }
        }
        Ok(())
    }

    /// Get the tensor ids of the stored gradient tensors
    pub fn get_ids(&self) -> impl Iterator<Item = &TensorId> {
        self.0.keys()
    }
}
