//! M-RoPE position ids, exactly as transformers' `get_rope_index` computes them.
//!
//! Per row, over the tokens the attention mask keeps: a text run gets `start + arange(len)`
//! on all three axes; an image's tokens get t = start (+ frame), h = start + block row,
//! w = start + block column; the next run starts at `start + max(grid_h, grid_w) / merge`.
//! Padded positions are 0. `rope_delta = max + 1 − kept_len` continues the positions while
//! decoding.

use crate::Error;

/// Positions `[3][B][S]` and one rope delta per row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RopeIndex {
    pub positions: [Vec<Vec<i64>>; 3],
    pub deltas: Vec<i64>,
}

/// Computes positions for a batch. `grids` are the images' (t, h, w) in order of appearance
/// across the whole batch (row 0's images first). Without any image, positions are
/// `arange(S)` on all axes and deltas 0, as transformers does for text (it ignores the mask
/// there).
pub fn rope_index(
    input_ids: &[Vec<u32>],
    attention_mask: Option<&[Vec<bool>]>,
    image_pad: u32,
    grids: &[[usize; 3]],
    merge: usize,
) -> Result<RopeIndex, Error> {
    let b = input_ids.len();
    let s = input_ids.first().map_or(0, Vec::len);
    let mut positions: [Vec<Vec<i64>>; 3] = std::array::from_fn(|_| vec![vec![0i64; s]; b]);
    let has_images = input_ids.iter().any(|row| row.contains(&image_pad));
    if !has_images {
        for axis in positions.iter_mut() {
            for row in axis.iter_mut() {
                for (i, p) in row.iter_mut().enumerate() {
                    *p = i as i64;
                }
            }
        }
        return Ok(RopeIndex {
            positions,
            deltas: vec![0; b],
        });
    }
    let mut grid_iter = grids.iter();
    let mut deltas = Vec::with_capacity(b);
    for (bi, row) in input_ids.iter().enumerate() {
        let kept: Vec<usize> = (0..row.len())
            .filter(|&i| attention_mask.is_none_or(|m| m[bi][i]))
            .collect();
        let mut current: i64 = 0;
        let mut max_pos: i64 = -1;
        let mut k = 0;
        while k < kept.len() {
            let is_image = row[kept[k]] == image_pad;
            let mut end = k;
            while end < kept.len() && (row[kept[end]] == image_pad) == is_image {
                end += 1;
            }
            if !is_image {
                for (n, &idx) in kept[k..end].iter().enumerate() {
                    let p = current + n as i64;
                    for axis in positions.iter_mut() {
                        axis[bi][idx] = p;
                    }
                    max_pos = max_pos.max(p);
                }
                current += (end - k) as i64;
                k = end;
            } else {
                // One image may follow another with no text between: take the run image by
                // image, each as many tokens as its grid says.
                let mut run = end - k;
                while run > 0 {
                    let &[t, h, w] = grid_iter.next().ok_or_else(|| Error::ImageTokens {
                        message: "more <|image_pad|> runs than images".into(),
                    })?;
                    let (lh, lw) = (h / merge, w / merge);
                    let n = t * lh * lw;
                    if n > run {
                        return Err(Error::ImageTokens {
                            message: format!(
                                "an image needs {n} <|image_pad|> tokens but its run has {run}"
                            ),
                        });
                    }
                    let mut idx = k;
                    for ti in 0..t {
                        for hi in 0..lh {
                            for wi in 0..lw {
                                let pos = kept[idx];
                                let (pt, ph, pw) = (
                                    current + ti as i64,
                                    current + hi as i64,
                                    current + wi as i64,
                                );
                                positions[0][bi][pos] = pt;
                                positions[1][bi][pos] = ph;
                                positions[2][bi][pos] = pw;
                                max_pos = max_pos.max(pt).max(ph).max(pw);
                                idx += 1;
                            }
                        }
                    }
                    current += (h.max(w) / merge) as i64;
                    k += n;
                    run -= n;
                }
            }
        }
        deltas.push(max_pos + 1 - kept.len() as i64);
    }
    if grid_iter.next().is_some() {
        return Err(Error::ImageTokens {
            message: "more images than <|image_pad|> runs".into(),
        });
    }
    Ok(RopeIndex { positions, deltas })
}
