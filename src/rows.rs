//! Row-subset taps: a golden tap kept at some token positions only (golden/README.md, "Row-subset taps").
//!
//! A long prefill's taps do not fit in golden/'s budget whole (qwen at 1,046 tokens: 3.7 MB per `l_out`,
//! 61 MB per `kq`), so the long-context goldens keep rows. Such a tap keeps its key `s{step}/{tap}` and its
//! layout, with the token axis (`checks::taps::token_axis`: 2, or 1 after RoPE) cut down to the rows at
//! the positions listed by the i32 tensor `rows/s{step}/{tap}` (ascending; the index along the step's
//! token axis, which for the prefill is the absolute position); every other axis is whole (`kq` rows keep
//! all `kv_len` columns).
//!
//! An engine dumps the whole tap, or only those rows in that order. [`cut`] turns the first into the
//! second, so that every check compares like with like, and [`RowCut`] does it for a whole engine run
//! (a [`TapSource`] over the engine's): the runner compares `RowCut`'s tensors with the golden's, and maps
//! a row index `i` of such a tap back to its position with [`RowCut::position`].

use crate::checks::taps::token_axis;
use crate::checks::TapSource;
use crate::error::{Error, Result};
use crate::golden::{TapsFile, Tensor};
use crate::tapname::TapId;
use std::collections::HashMap;

/// The prefix of the positions tensors: `rows/s0/l_out-0` lists the rows `s0/l_out-0` keeps.
pub const PREFIX: &str = "rows/";

/// The key of the positions tensor of the tap `key` (`s0/l_out-0` → `rows/s0/l_out-0`).
pub fn rows_key(key: &str) -> String {
    format!("{PREFIX}{key}")
}

/// The positions the golden tap `key` keeps, when it is a row-subset tap (`None`: a whole tap). Checked:
/// the list is strictly ascending, non-negative, and as long as the tap's token axis; a file that breaks
/// this is an error naming it.
pub fn positions(golden: &TapsFile, key: &str) -> Result<Option<Vec<usize>>> {
    let rk = rows_key(key);
    if !golden.contains(&rk) {
        return Ok(None);
    }
    let bad = |reason: String| Error::Other(format!("{}: {rk}: {reason} (golden/README.md, \"Row-subset taps\")", golden.path.display()));
    let raw = golden.ints(&rk)?;
    let id = TapId::parse_key(key).ok_or_else(|| bad(format!("{key} is not a tap key")))?;
    let shape = golden.shape(key).ok_or_else(|| bad(format!("lists rows of {key}, which the file does not hold")))?;
    if shape.len() != 4 {
        return Err(bad(format!("{key} is {}-D; row subsets are of 4-D taps", shape.len())));
    }
    let rows = shape[token_axis(&id, &shape)];
    if raw.len() != rows {
        return Err(bad(format!("{} positions for the {rows} rows of {key} {shape:?}", raw.len())));
    }
    if raw.iter().any(|&p| p < 0) || raw.windows(2).any(|w| w[0] >= w[1]) {
        return Err(bad(format!("positions must be ascending and non-negative, found {raw:?}")));
    }
    Ok(Some(raw.into_iter().map(|p| p as usize).collect()))
}

/// Every row-subset tap of a golden: tap key → its positions.
pub fn all_positions(golden: &TapsFile) -> Result<HashMap<String, Vec<usize>>> {
    let mut out = HashMap::new();
    for k in golden.keys() {
        if let Some(tap) = k.strip_prefix(PREFIX) {
            let p = positions(golden, tap)?.expect("the rows key exists");
            out.insert(tap.to_string(), p);
        }
    }
    Ok(out)
}

/// `engine` (a whole tap, or already the kept rows) cut to the rows at `positions` of a golden tap of
/// shape `golden_shape`. An engine tensor of the golden's own shape is taken as already cut. Otherwise it
/// must be 4-D with the golden's shape on every axis but the token axis, which must reach the last
/// position; else the reason, naming the tap, both shapes and the positions.
pub fn cut(id: &TapId, engine: Tensor, golden_shape: &[usize], positions: &[usize]) -> std::result::Result<Tensor, String> {
    if engine.shape == golden_shape {
        return Ok(engine);
    }
    let key = id.key();
    let ax = token_axis(id, golden_shape);
    let last = positions.last().copied().unwrap_or(0);
    let fits = engine.shape.len() == 4
        && golden_shape.len() == 4
        && (0..4).all(|a| a == ax || engine.shape[a] == golden_shape[a])
        && engine.shape[ax] > last
        && engine.data.len() == engine.shape.iter().product::<usize>();
    if !fits {
        return Err(format!(
            "{key}: the golden keeps the rows at positions {} of this tap ({golden_shape:?}, token axis {ax}); the engine's {:?} is neither those rows nor a whole tap reaching position {last}",
            fmt_positions(positions),
            engine.shape
        ));
    }
    let n = engine.shape[ax];
    let inner: usize = engine.shape[ax + 1..].iter().product();
    let outer: usize = engine.shape[..ax].iter().product();
    // [outer][n][inner] → [outer][positions][inner]
    let mut data = Vec::with_capacity(outer * positions.len() * inner);
    for o in 0..outer {
        for &p in positions {
            let at = (o * n + p) * inner;
            data.extend_from_slice(&engine.data[at..at + inner]);
        }
    }
    let mut shape = engine.shape;
    shape[ax] = positions.len();
    Ok(Tensor { shape, data })
}

/// An engine's taps as a golden with row-subset taps sees them: each such tap cut to the golden's rows
/// ([`cut`]); every other tap as the engine gave it. A tap that cannot be cut is passed on whole, so that
/// the comparison reports its shape mismatch like any other.
pub struct RowCut<'a> {
    engine: &'a dyn TapSource,
    /// tap key → (positions, the golden's shape)
    rows: HashMap<String, (Vec<usize>, Vec<usize>)>,
}

impl<'a> RowCut<'a> {
    pub fn new(golden: &TapsFile, engine: &'a dyn TapSource) -> Result<RowCut<'a>> {
        let rows = all_positions(golden)?
            .into_iter()
            .map(|(k, p)| {
                let shape = golden.shape(&k).unwrap_or_default();
                (k, (p, shape))
            })
            .collect();
        Ok(RowCut { engine, rows })
    }

    /// The positions of a row-subset tap (`None`: a whole tap).
    pub fn positions(&self, key: &str) -> Option<&[usize]> {
        self.rows.get(key).map(|(p, _)| p.as_slice())
    }

    /// The position of row `i` of tap `key` as compared (its index in a whole tap).
    pub fn position(&self, key: &str, i: usize) -> usize {
        self.positions(key).and_then(|p| p.get(i).copied()).unwrap_or(i)
    }

    /// Whether the golden holds any row-subset tap.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

impl TapSource for RowCut<'_> {
    fn keys(&self) -> Vec<String> {
        self.engine.keys()
    }
    fn tensor(&self, key: &str) -> Option<Result<Tensor>> {
        let t = self.engine.tensor(key)?;
        let Some((pos, shape)) = self.rows.get(key) else { return Some(t) };
        let Some(id) = TapId::parse_key(key) else { return Some(t) };
        Some(t.map(|t| {
            let whole = t.clone();
            cut(&id, t, shape, pos).unwrap_or(whole)
        }))
    }
    fn stored_dtype(&self, key: &str) -> Option<safetensors::Dtype> {
        self.engine.stored_dtype(key)
    }
}

/// `0, 1, 63, 64, …, 1045` for messages.
pub fn fmt_positions(p: &[usize]) -> String {
    let s: Vec<String> = p.iter().map(|v| v.to_string()).collect();
    if s.len() <= 8 {
        s.join(", ")
    } else {
        format!("{}, … ({} more), {}", s[..5].join(", "), s.len() - 6, s[s.len() - 1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::MemTaps;
    use crate::golden::write_safetensors;

    fn seq(shape: &[usize]) -> Tensor {
        Tensor { shape: shape.to_vec(), data: (0..shape.iter().product::<usize>()).map(|v| v as f32).collect() }
    }

    #[test]
    fn cut_takes_rows_along_the_token_axis() {
        // kq-like [1, heads 2, tokens 5, kv 5]: rows 1 and 4 of each head, every column
        let id = TapId::parse_key("s0/kq-0").unwrap();
        let t = cut(&id, seq(&[1, 2, 5, 5]), &[1, 2, 2, 5], &[1, 4]).unwrap();
        assert_eq!(t.shape, vec![1, 2, 2, 5]);
        let want: Vec<f32> = [5, 6, 7, 8, 9, 20, 21, 22, 23, 24, 30, 31, 32, 33, 34, 45, 46, 47, 48, 49].iter().map(|&v| v as f32).collect();
        assert_eq!(t.data, want);
        // after RoPE the token axis is 1: [1, tokens 3, heads 2, dh 1]
        let id = TapId::parse_key("s0/Qcur-0.rope").unwrap();
        assert_eq!(cut(&id, seq(&[1, 3, 2, 1]), &[1, 1, 2, 1], &[2]).unwrap().data, vec![4.0, 5.0]);
        // already the kept rows: unchanged
        let id = TapId::parse_key("s0/l_out-0").unwrap();
        assert_eq!(cut(&id, seq(&[1, 1, 2, 3]), &[1, 1, 2, 3], &[0, 7]).unwrap(), seq(&[1, 1, 2, 3]));
        // too short to reach the last position, or another width: the reason names the tap
        let e = cut(&id, seq(&[1, 1, 5, 3]), &[1, 1, 2, 3], &[0, 7]).unwrap_err();
        assert!(e.contains("s0/l_out-0") && e.contains("position 7") && e.contains("[1, 1, 5, 3]"), "{e}");
        assert!(cut(&id, seq(&[1, 1, 9, 4]), &[1, 1, 2, 3], &[0, 7]).is_err());
    }

    #[test]
    fn golden_positions_are_checked_and_cut_the_engine() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("g.safetensors");
        let g = seq(&[1, 1, 2, 3]);
        write_safetensors(
            &p,
            &[("s0/l_out-0".into(), g.shape.clone(), g.data.clone()), ("s1/l_out-0".into(), vec![1, 1, 1, 3], vec![0.0; 3])],
            &[("rows/s0/l_out-0".into(), vec![2], vec![1, 3]), ("tokens".into(), vec![4], vec![1, 2, 3, 4])],
        )
        .unwrap();
        let golden = TapsFile::open(&p).unwrap();
        assert_eq!(positions(&golden, "s0/l_out-0").unwrap(), Some(vec![1, 3]));
        assert_eq!(positions(&golden, "s1/l_out-0").unwrap(), None);
        // the rows tensor is not a tap
        assert_eq!(golden.taps().len(), 2);

        let mut engine = MemTaps::default();
        engine.0.insert("s0/l_out-0".into(), seq(&[1, 1, 4, 3]));
        engine.0.insert("s1/l_out-0".into(), seq(&[1, 1, 1, 3]));
        let rc = RowCut::new(&golden, &engine).unwrap();
        assert_eq!(rc.tensor("s0/l_out-0").unwrap().unwrap().data, vec![3., 4., 5., 9., 10., 11.]);
        assert_eq!(rc.tensor("s1/l_out-0").unwrap().unwrap(), seq(&[1, 1, 1, 3]));
        assert_eq!((rc.position("s0/l_out-0", 1), rc.position("s1/l_out-0", 0)), (3, 0));
        // a tap that cannot be cut is passed on whole (the comparison reports the shape mismatch)
        engine.0.insert("s0/l_out-0".into(), seq(&[1, 1, 2, 4]));
        let rc = RowCut::new(&golden, &engine).unwrap();
        assert_eq!(rc.tensor("s0/l_out-0").unwrap().unwrap().shape, vec![1, 1, 2, 4]);
        assert!(rc.tensor("s0/nope").is_none());
    }

    #[test]
    fn malformed_positions_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        for (name, rows, want) in
            [("count", vec![1, 3, 5], "3 positions for the 2 rows"), ("order", vec![3, 1], "ascending"), ("neg", vec![-1, 2], "ascending")]
        {
            let p = dir.path().join(format!("{name}.safetensors"));
            write_safetensors(&p, &[("s0/l_out-0".into(), vec![1, 1, 2, 3], vec![0.0; 6])], &[("rows/s0/l_out-0".into(), vec![rows.len()], rows)]).unwrap();
            let golden = TapsFile::open(&p).unwrap();
            let e = positions(&golden, "s0/l_out-0").unwrap_err().to_string();
            assert!(e.contains(&format!("{name}.safetensors")) && e.contains(want), "{e}");
            assert!(RowCut::new(&golden, &MemTaps::default()).is_err());
        }
        let p = dir.path().join("orphan.safetensors");
        write_safetensors(&p, &[], &[("rows/s0/l_out-0".into(), vec![1], vec![0])]).unwrap();
        let e = positions(&TapsFile::open(&p).unwrap(), "s0/l_out-0").unwrap_err().to_string();
        assert!(e.contains("does not hold"), "{e}");
    }
}
