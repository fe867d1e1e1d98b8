//! The shard writer: rows of segments to flat little-endian arrays, as
//! `irtrain/shards.py` specifies (that docstring is the contract; the
//! pure-Python `write_shard_set` is the oracle the tests compare against,
//! byte for byte).
//!
//! Rows are streamed: each array file is appended to as rows arrive and hashed
//! (sha256) on the way, and a shard is closed after `shard_rows` rows. With no
//! rows at all one empty shard is written, as the reference writer does.
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{CoreError, Result};
use crate::mask::IGNORE_INDEX;

/// The arrays of a shard, in the order of `shards.ARRAYS`.
pub const ARRAY_NAMES: [&str; 8] = [
    "input_ids",
    "labels",
    "position_ids",
    "row_offsets",
    "seg_offsets",
    "seg_example",
    "seg_part",
    "seg_score",
];

/// One segment to write: a tokenized sequence with its labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
    pub example: i64,
    pub part: i32,
    pub score: f32,
}

impl Segment {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
}

/// What the manifest records of one written shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMeta {
    pub name: String,
    pub rows: u64,
    pub segments: u64,
    pub tokens: u64,
    /// (file name, hex sha256), in `ARRAY_NAMES` order.
    pub sha256: Vec<(String, String)>,
}

struct ArrayFile {
    name: &'static str,
    out: BufWriter<File>,
    hash: Sha256,
}

impl ArrayFile {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.hash.update(bytes);
        self.out.write_all(bytes)?;
        Ok(())
    }
}

struct OpenShard {
    name: String,
    files: Vec<ArrayFile>,
    rows: u64,
    segments: u64,
    tokens: u64,
    buf: Vec<u8>,
}

const IDS: usize = 0;
const LABELS: usize = 1;
const POS: usize = 2;
const ROW_OFF: usize = 3;
const SEG_OFF: usize = 4;
const SEG_EX: usize = 5;
const SEG_PART: usize = 6;
const SEG_SCORE: usize = 7;

impl OpenShard {
    fn create(dir: &Path, index: usize) -> Result<Self> {
        let name = format!("shard-{index:05}");
        let root = dir.join(&name);
        fs::create_dir_all(&root)?;
        let mut files = Vec::with_capacity(ARRAY_NAMES.len());
        for n in ARRAY_NAMES {
            let f = File::create(root.join(format!("{n}.bin")))?;
            files.push(ArrayFile {
                name: n,
                out: BufWriter::with_capacity(1 << 20, f),
                hash: Sha256::new(),
            });
        }
        let mut s = Self {
            name,
            files,
            rows: 0,
            segments: 0,
            tokens: 0,
            buf: Vec::new(),
        };
        s.files[ROW_OFF].write(&0i64.to_le_bytes())?;
        s.files[SEG_OFF].write(&0i64.to_le_bytes())?;
        Ok(s)
    }

    fn push_row(&mut self, row: &[&Segment]) -> Result<()> {
        for seg in row {
            let n = seg.input_ids.len();
            if n == 0 || seg.labels.len() != n {
                return Err(CoreError::Input(format!(
                    "segment of example {}: input_ids and labels must be non-empty and of equal length",
                    seg.example
                )));
            }
            self.buf.clear();
            for &id in &seg.input_ids {
                self.buf.extend_from_slice(&id.to_le_bytes());
            }
            self.files[IDS].write(&self.buf)?;
            self.buf.clear();
            self.buf.extend_from_slice(&IGNORE_INDEX.to_le_bytes());
            for &l in &seg.labels[1..] {
                self.buf.extend_from_slice(&l.to_le_bytes());
            }
            self.files[LABELS].write(&self.buf)?;
            self.buf.clear();
            for p in 0..n as i32 {
                self.buf.extend_from_slice(&p.to_le_bytes());
            }
            self.files[POS].write(&self.buf)?;
            self.tokens += n as u64;
            self.segments += 1;
            self.files[SEG_OFF].write(&(self.tokens as i64).to_le_bytes())?;
            self.files[SEG_EX].write(&seg.example.to_le_bytes())?;
            self.files[SEG_PART].write(&seg.part.to_le_bytes())?;
            self.files[SEG_SCORE].write(&seg.score.to_le_bytes())?;
        }
        self.rows += 1;
        self.files[ROW_OFF].write(&(self.tokens as i64).to_le_bytes())?;
        Ok(())
    }

    fn close(self) -> Result<ShardMeta> {
        let mut sha256 = Vec::with_capacity(self.files.len());
        for mut f in self.files {
            f.out.flush()?;
            f.out
                .into_inner()
                .map_err(|e| CoreError::Io(e.into_error()))?
                .sync_all()?;
            sha256.push((format!("{}.bin", f.name), hex(&f.hash.finalize())));
        }
        Ok(ShardMeta {
            name: self.name,
            rows: self.rows,
            segments: self.segments,
            tokens: self.tokens,
            sha256,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Streams rows into `dir/shard-00000/`, `dir/shard-00001/`, ...
pub struct ShardWriter {
    dir: PathBuf,
    shard_rows: u64,
    current: Option<OpenShard>,
    done: Vec<ShardMeta>,
}

impl ShardWriter {
    pub fn new(dir: impl Into<PathBuf>, shard_rows: usize) -> Result<Self> {
        if shard_rows == 0 {
            return Err(CoreError::Input("shard_rows must be at least 1".into()));
        }
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            shard_rows: shard_rows as u64,
            current: None,
            done: Vec::new(),
        })
    }

    /// Append one row (its segments in order).
    pub fn push_row(&mut self, row: &[&Segment]) -> Result<()> {
        if self.current.is_none() {
            self.current = Some(OpenShard::create(&self.dir, self.done.len())?);
        }
        let cur = self.current.as_mut().expect("open shard");
        cur.push_row(row)?;
        if cur.rows >= self.shard_rows {
            let full = self.current.take().expect("open shard");
            self.done.push(full.close()?);
        }
        Ok(())
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.done.iter().map(|s| s.rows).sum::<u64>() + self.current.as_ref().map_or(0, |c| c.rows)
    }

    /// Close the last shard and return every shard's metadata.
    pub fn finish(mut self) -> Result<Vec<ShardMeta>> {
        if let Some(cur) = self.current.take() {
            self.done.push(cur.close()?);
        }
        if self.done.is_empty() {
            self.done.push(OpenShard::create(&self.dir, 0)?.close()?);
        }
        Ok(self.done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(ids: &[u32], example: i64, part: i32) -> Segment {
        Segment {
            input_ids: ids.to_vec(),
            labels: ids.iter().map(|&i| i as i32).collect(),
            example,
            part,
            score: f32::NAN,
        }
    }

    fn read<T: Copy>(path: &Path, conv: fn(&[u8]) -> T, size: usize) -> Vec<T> {
        fs::read(path).unwrap().chunks(size).map(conv).collect()
    }

    #[test]
    fn arrays_follow_the_contract() {
        let dir = std::env::temp_dir().join(format!("irtrain-shard-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut w = ShardWriter::new(&dir, 2).unwrap();
        let (a, b, c) = (seg(&[5, 6, 7], 0, 0), seg(&[8, 9], 0, 1), seg(&[1], 1, 0));
        w.push_row(&[&a, &b]).unwrap();
        w.push_row(&[&c]).unwrap();
        w.push_row(&[&c]).unwrap();
        let metas = w.finish().unwrap();
        assert_eq!(metas.len(), 2);
        assert_eq!(
            (metas[0].rows, metas[0].segments, metas[0].tokens),
            (2, 3, 6)
        );
        let s0 = dir.join("shard-00000");
        let i32s = |b: &[u8]| i32::from_le_bytes(b.try_into().unwrap());
        let i64s = |b: &[u8]| i64::from_le_bytes(b.try_into().unwrap());
        assert_eq!(
            read(&s0.join("labels.bin"), i32s, 4),
            vec![-100, 6, 7, -100, 9, -100]
        );
        assert_eq!(
            read(&s0.join("position_ids.bin"), i32s, 4),
            vec![0, 1, 2, 0, 1, 0]
        );
        assert_eq!(read(&s0.join("row_offsets.bin"), i64s, 8), vec![0, 5, 6]);
        assert_eq!(read(&s0.join("seg_offsets.bin"), i64s, 8), vec![0, 3, 5, 6]);
        assert_eq!(read(&s0.join("seg_part.bin"), i32s, 4), vec![0, 1, 0]);
        let digest = hex(&Sha256::digest(fs::read(s0.join("input_ids.bin")).unwrap()));
        assert_eq!(metas[0].sha256[0], ("input_ids.bin".to_string(), digest));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_rows_writes_one_empty_shard() {
        let dir = std::env::temp_dir().join(format!("irtrain-shard-empty-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let metas = ShardWriter::new(&dir, 4).unwrap().finish().unwrap();
        assert_eq!(metas.len(), 1);
        assert_eq!(
            fs::read(dir.join("shard-00000/row_offsets.bin")).unwrap(),
            0i64.to_le_bytes()
        );
        assert_eq!(
            fs::read(dir.join("shard-00000/input_ids.bin"))
                .unwrap()
                .len(),
            0
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn empty_segment_is_rejected() {
        let dir = std::env::temp_dir().join(format!("irtrain-shard-bad-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let mut w = ShardWriter::new(&dir, 4).unwrap();
        assert!(w.push_row(&[&seg(&[], 0, 0)]).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
