//! `#[pyclass]`/`#[pyfunction]` wrappers over the data path of `irtrain_core`
//! (`prepare`, `rows`, `template`, `mask`, `pack`, `shard`). Strings, bytes and
//! numpy arrays in; numpy arrays, strings and plain values out; the GIL is
//! released around every O(n) step. Reached through `irtrain.data`.
use irtrain_core::mask::MaskKind;
use irtrain_core::pack::best_fit_decreasing;
use irtrain_core::prepare::{Counts, Encoder, Options, Preparer, RowError, Truncation};
use irtrain_core::rows::{detect_format_renamed, Columns, Format};
use irtrain_core::shard::{Segment, ShardMeta, ShardWriter};
use irtrain_core::steps::StepSplitter;
use irtrain_core::template::ChatTemplate;
use irtrain_core::tokenize::Tok;
use irtrain_core::CoreError;
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::{PyBytes, PyDict};
use serde_json::json;

use crate::errors::to_pyerr;

type RowErrors = Vec<(u64, String, String)>;

fn row_errors(errors: Vec<RowError>) -> RowErrors {
    errors
        .into_iter()
        .map(|e| (e.row, e.kind.to_string(), e.message))
        .collect()
}

/// How rows are read (`Encoder::with_rows`, `with_template_vars`): `--columns` pairs, whether
/// the chat template applies, the fields passed to the template, the clock of `strftime_now`.
#[derive(Clone, Default)]
struct RowSettings {
    columns: Vec<(String, String)>,
    apply_chat_template: bool,
    template_vars: Vec<String>,
    clock: Option<i64>,
}

fn build_encoder(
    tokenizer_file: &str,
    chat_template: &str,
    special_tokens: &[(String, String)],
    format: &str,
    mask: &str,
    fast_bpe: bool,
    rows: RowSettings,
) -> Result<Encoder, CoreError> {
    let tok = Tok::from_file(tokenizer_file, fast_bpe)?;
    let mut tpl = ChatTemplate::new(chat_template, special_tokens)?;
    if let Some(secs) = rows.clock {
        tpl.set_clock(secs);
    }
    let special = |name: &str| {
        special_tokens
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    Encoder::new(tok, tpl, Format::parse(format)?, MaskKind::parse(mask)?)
        .with_template_vars(&rows.template_vars)
        .with_rows(
            Columns {
                pairs: rows.columns,
            },
            rows.apply_chat_template,
            special("eos_token"),
    )
}

/// Renders, tokenizes and masks rows without packing or writing.
#[pyclass(module = "irtrain._rust", name = "Encoder", frozen)]
pub struct PyEncoder {
    inner: Encoder,
    pool: rayon::ThreadPool,
}

#[pymethods]
impl PyEncoder {
    #[new]
    #[pyo3(signature = (tokenizer_file, chat_template, special_tokens, format, mask, threads = 0, fast_bpe = true,
                        *, template_vars = Vec::new(), clock = None, columns = vec![], apply_chat_template = true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        tokenizer_file: &str,
        chat_template: &str,
        special_tokens: Vec<(String, String)>,
        format: &str,
        mask: &str,
        threads: usize,
        fast_bpe: bool,
        template_vars: Vec<String>,
        clock: Option<i64>,
        columns: Vec<(String, String)>,
        apply_chat_template: bool,
    ) -> PyResult<Self> {
        let rows = RowSettings {
            columns,
            apply_chat_template,
            template_vars,
            clock,
        };
        let inner = py
            .detach(|| {
                build_encoder(
                    tokenizer_file,
                    chat_template,
                    &special_tokens,
                    format,
                    mask,
                    fast_bpe,
                    rows,
                )
            })
            .map_err(to_pyerr)?;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| to_pyerr(CoreError::Input(format!("cannot start threads: {e}"))))?;
        Ok(Self { inner, pool })
    }

    /// Encode the JSON lines of `buf`. Returns (arrays, errors): flat
    /// `input_ids` <u4, `labels` <i4, `seg_offsets` <i8 [S+1], `seg_example`
    /// <i8, `seg_part` <i4, `seg_score` <f4, `seg_row` <u8 (1-based source
    /// row); errors are (row, kind, message) of the rows that failed.
    #[pyo3(signature = (buf, first_row = 1, first_example = 0))]
    fn encode_jsonl<'py>(
        &self,
        py: Python<'py>,
        buf: PyBackedBytes,
        first_row: u64,
        first_example: i64,
    ) -> PyResult<(Bound<'py, PyDict>, RowErrors)> {
        let (flat, errors) = py.detach(|| {
            let (results, _) = self
                .pool
                .install(|| self.inner.encode_lines(&buf, first_row, first_example));
            let mut flat = Flat::default();
            let mut errors = Vec::new();
            for (row, r) in results {
                match r {
                    Ok(enc) => {
                        for s in enc.examples.iter().flat_map(|ex| &ex.segments) {
                            flat.push(s, row);
                        }
                    }
                    Err(e) => errors.push(e),
                }
            }
            (flat, errors)
        });
        Ok((flat.into_dict(py)?, row_errors(errors)))
    }

    /// sha256 of the tokenizer's canonical serialization (= of `Tokenizer.from_file(path).to_str()`).
    #[getter]
    fn tokenizer_hash(&self) -> String {
        self.inner.tokenizer_hash().to_string()
    }

    /// Whether the fast byte-level BPE path is in use (else the `tokenizers` crate).
    #[getter]
    fn fast_bpe(&self) -> bool {
        self.inner.fast_bpe()
    }

    /// Render one conversation (a JSON list of messages) with the chat template.
    #[pyo3(signature = (messages_json, add_generation_prompt = false))]
    fn render(&self, messages_json: &str, add_generation_prompt: bool) -> PyResult<String> {
        self.inner
            .render_json(messages_json, add_generation_prompt)
            .map_err(to_pyerr)
    }
}

#[derive(Default)]
struct Flat {
    input_ids: Vec<u32>,
    labels: Vec<i32>,
    seg_offsets: Vec<i64>,
    seg_example: Vec<i64>,
    seg_part: Vec<i32>,
    seg_score: Vec<f32>,
    seg_row: Vec<u64>,
}

impl Flat {
    fn push(&mut self, s: &Segment, row: u64) {
        if self.seg_offsets.is_empty() {
            self.seg_offsets.push(0);
        }
        self.input_ids.extend_from_slice(&s.input_ids);
        self.labels.extend_from_slice(&s.labels);
        self.seg_offsets.push(self.input_ids.len() as i64);
        self.seg_example.push(s.example);
        self.seg_part.push(s.part);
        self.seg_score.push(s.score);
        self.seg_row.push(row);
    }

    fn into_dict(mut self, py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
        if self.seg_offsets.is_empty() {
            self.seg_offsets.push(0);
        }
        let d = PyDict::new(py);
        d.set_item("input_ids", PyArray1::from_vec(py, self.input_ids))?;
        d.set_item("labels", PyArray1::from_vec(py, self.labels))?;
        d.set_item("seg_offsets", PyArray1::from_vec(py, self.seg_offsets))?;
        d.set_item("seg_example", PyArray1::from_vec(py, self.seg_example))?;
        d.set_item("seg_part", PyArray1::from_vec(py, self.seg_part))?;
        d.set_item("seg_score", PyArray1::from_vec(py, self.seg_score))?;
        d.set_item("seg_row", PyArray1::from_vec(py, self.seg_row))?;
        Ok(d)
    }
}

/// The whole `prepare` pipeline writing shards into `out_dir`, fed buffer by buffer.
#[pyclass(module = "irtrain._rust", name = "Preparer")]
pub struct PyPreparer {
    inner: Option<Preparer>,
}

impl PyPreparer {
    fn get(&mut self) -> PyResult<&mut Preparer> {
        self.inner
            .as_mut()
            .ok_or_else(|| to_pyerr(CoreError::Input("this Preparer is finished".into())))
    }
}

#[pymethods]
impl PyPreparer {
    #[new]
    #[pyo3(signature = (tokenizer_file, chat_template, special_tokens, format, mask, out_dir, *, max_len,
                        truncation, pack, shard_rows, skip_invalid = false, threads = 0, window_tokens = 0,
                        fast_bpe = true, template_vars = Vec::new(), clock = None, columns = vec![],
                        apply_chat_template = true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        tokenizer_file: &str,
        chat_template: &str,
        special_tokens: Vec<(String, String)>,
        format: &str,
        mask: &str,
        out_dir: &str,
        max_len: usize,
        truncation: &str,
        pack: bool,
        shard_rows: usize,
        skip_invalid: bool,
        threads: usize,
        window_tokens: usize,
        fast_bpe: bool,
        template_vars: Vec<String>,
        clock: Option<i64>,
        columns: Vec<(String, String)>,
        apply_chat_template: bool,
    ) -> PyResult<Self> {
        let rows = RowSettings {
            columns,
            apply_chat_template,
            template_vars,
            clock,
        };
        let inner = py
            .detach(|| {
                let enc = build_encoder(
                    tokenizer_file,
                    chat_template,
                    &special_tokens,
                    format,
                    mask,
                    fast_bpe,
                    rows,
                )?;
                let opts = Options {
                    max_len,
                    truncation: Truncation::parse(truncation)?,
                    pack,
                    shard_rows,
                    skip_invalid,
                    threads,
                    window_tokens,
                };
                Preparer::new(enc, opts, out_dir)
            })
            .map_err(to_pyerr)?;
        Ok(Self { inner: Some(inner) })
    }

    /// Feed JSON lines (rows numbered from `first_row`). Returns (rows read,
    /// errors as (row, kind, message)). Without skip_invalid a buffer with
    /// errors is not committed.
    fn add_jsonl(
        &mut self,
        py: Python<'_>,
        buf: PyBackedBytes,
        first_row: u64,
    ) -> PyResult<(u64, RowErrors)> {
        let p = self.get()?;
        let outcome = py
            .detach(|| p.add_lines(&buf, first_row))
            .map_err(to_pyerr)?;
        Ok((outcome.rows, row_errors(outcome.errors)))
    }

    /// sha256 of the tokenizer's canonical serialization (= of `Tokenizer.from_file(path).to_str()`).
    #[getter]
    fn tokenizer_hash(&mut self) -> PyResult<String> {
        Ok(self.get()?.encoder().tokenizer_hash().to_string())
    }

    /// Whether the fast byte-level BPE path is in use (else the `tokenizers` crate).
    #[getter]
    fn fast_bpe(&mut self) -> PyResult<bool> {
        Ok(self.get()?.encoder().fast_bpe())
    }

    /// Rows read so far, examples kept, tokens written (for progress display).
    fn progress(&mut self) -> PyResult<(u64, u64, u64)> {
        let c = self.get()?.counts();
        Ok((c.docs_in, c.docs_out, c.tokens_total))
    }

    /// Pack what is left and close the shards. Returns JSON:
    /// `{"shards": [{"name", "rows", "segments", "tokens", "sha256": {...}}, ...], "counts": {...}}`.
    fn finish(&mut self, py: Python<'_>) -> PyResult<String> {
        let p = self
            .inner
            .take()
            .ok_or_else(|| to_pyerr(CoreError::Input("this Preparer is finished".into())))?;
        let (metas, counts) = py.detach(|| p.finish()).map_err(to_pyerr)?;
        Ok(json!({"shards": metas_json(&metas), "counts": counts_json(&counts)}).to_string())
    }
}

fn metas_json(metas: &[ShardMeta]) -> serde_json::Value {
    metas
        .iter()
        .map(|m| {
            let sha: serde_json::Map<String, serde_json::Value> =
                m.sha256.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
            json!({"name": m.name, "rows": m.rows, "segments": m.segments, "tokens": m.tokens, "sha256": sha})
        })
        .collect()
}

fn counts_json(c: &Counts) -> serde_json::Value {
    json!({
        "docs_in": c.docs_in, "docs_out": c.docs_out, "skipped": c.skipped,
        "dropped_too_long": c.dropped_too_long, "dropped_nothing_trained": c.dropped_nothing_trained,
        "truncated": c.truncated, "segments": c.segments, "rows": c.rows,
        "tokens_total": c.tokens_total, "tokens_trained": c.tokens_trained, "windows": c.windows,
        "split_rows": c.split_rows, "split_examples": c.split_examples, "split_reason": c.split_reason,
        "inference_turns": c.inference_turns, "inference_reason": c.inference_reason,
    })
}

/// The format a JSON row's fields indicate (chat, preference, prompt-completion, unpaired,
/// ranked, text), after renaming its fields as `columns` ((name, column) pairs) says.
#[pyfunction]
#[pyo3(signature = (line, columns = vec![]))]
fn detect_format(line: &str, columns: Vec<(String, String)>) -> PyResult<String> {
    detect_format_renamed(line, &Columns { pairs: columns })
        .map(|f| f.name().to_string())
        .map_err(to_pyerr)
}

/// Best-fit-decreasing packing of items of `lengths` into rows of `capacity`:
/// item indices per row.
#[pyfunction]
fn pack_bfd(
    py: Python<'_>,
    lengths: PyReadonlyArray1<'_, i64>,
    capacity: usize,
) -> PyResult<Vec<Vec<usize>>> {
    let lens: Vec<usize> = lengths
        .as_array()
        .iter()
        .map(|&l| {
            usize::try_from(l)
                .map_err(|_| to_pyerr(CoreError::Input(format!("negative length {l}"))))
        })
        .collect::<PyResult<_>>()?;
    py.detach(|| best_fit_decreasing(&lens, capacity))
        .map_err(to_pyerr)
}

/// Write rows of segments as shards (the Rust writer `prepare` uses). Segment
/// j is `input_ids[seg_offsets[j]:seg_offsets[j+1]]`; row r holds segments
/// `row_segments[r]:row_segments[r+1]`. Returns the shards' metadata as JSON.
#[pyfunction]
#[allow(clippy::too_many_arguments)]
fn write_shards(
    py: Python<'_>,
    out_dir: &str,
    shard_rows: usize,
    input_ids: PyReadonlyArray1<'_, u32>,
    labels: PyReadonlyArray1<'_, i32>,
    seg_offsets: PyReadonlyArray1<'_, i64>,
    seg_example: PyReadonlyArray1<'_, i64>,
    seg_part: PyReadonlyArray1<'_, i32>,
    seg_score: PyReadonlyArray1<'_, f32>,
    row_segments: PyReadonlyArray1<'_, i64>,
) -> PyResult<String> {
    let ids = input_ids.as_array().to_vec();
    let labels = labels.as_array().to_vec();
    let offs = seg_offsets.as_array().to_vec();
    let ex = seg_example.as_array().to_vec();
    let part = seg_part.as_array().to_vec();
    let score = seg_score.as_array().to_vec();
    let rows = row_segments.as_array().to_vec();
    let metas = py
        .detach(|| -> Result<Vec<ShardMeta>, CoreError> {
            let n_seg = ex.len();
            let bad = |m: &str| CoreError::Input(format!("write_shards: {m}"));
            if offs.len() != n_seg + 1
                || part.len() != n_seg
                || score.len() != n_seg
                || ids.len() != labels.len()
            {
                return Err(bad("array lengths do not agree"));
            }
            if offs.first() != Some(&0)
                || *offs.last().unwrap() as usize != ids.len()
                || offs.windows(2).any(|w| w[1] < w[0])
            {
                return Err(bad("seg_offsets must rise from 0 to len(input_ids)"));
            }
            if rows.first() != Some(&0)
                || *rows.last().unwrap_or(&0) as usize != n_seg
                || rows.windows(2).any(|w| w[1] < w[0])
            {
                return Err(bad(
                    "row_segments must rise from 0 to the number of segments",
                ));
            }
            let segs: Vec<Segment> = (0..n_seg)
                .map(|j| {
                    let (a, b) = (offs[j] as usize, offs[j + 1] as usize);
                    Segment {
                        input_ids: ids[a..b].to_vec(),
                        labels: labels[a..b].to_vec(),
                        example: ex[j],
                        part: part[j],
                        score: score[j],
                    }
                })
                .collect();
            let mut w = ShardWriter::new(out_dir, shard_rows)?;
            for r in rows.windows(2) {
                let row: Vec<&Segment> = segs[r[0] as usize..r[1] as usize].iter().collect();
                w.push_row(&row)?;
            }
            w.finish()
        })
        .map_err(to_pyerr)?;
    Ok(metas_json(&metas).to_string())
}

/// `irtrain score`'s states (`irtrain_core::steps`), for one tokenizer.
#[pyclass(module = "irtrain._rust", name = "StepSplitter", frozen)]
pub struct PyStepSplitter {
    inner: StepSplitter,
}

/// A 1-D array's values, borrowed when contiguous.
fn slice_of<'a, T: numpy::Element + Copy>(
    a: &'a PyReadonlyArray1<'_, T>,
) -> std::borrow::Cow<'a, [T]> {
    match a.as_slice() {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => std::borrow::Cow::Owned(a.as_array().iter().copied().collect()),
    }
}

#[pymethods]
impl PyStepSplitter {
    /// From the JSON text of the tokenizer (`backend_tokenizer.to_str()`).
    #[new]
    fn new(py: Python<'_>, tokenizer_json: &str) -> PyResult<Self> {
        let inner = py
            .detach(|| StepSplitter::from_json(tokenizer_json))
            .map_err(to_pyerr)?;
        Ok(Self { inner })
    }

    /// Whether token bytes come from the byte-level alphabet (else incremental decoding).
    #[getter]
    fn byte_level(&self) -> bool {
        self.inner.is_byte_level()
    }

    /// The exact bytes each token contributes to the decoded text.
    fn token_bytes<'py>(
        &self,
        py: Python<'py>,
        ids: PyReadonlyArray1<'py, u32>,
    ) -> PyResult<Vec<Bound<'py, PyBytes>>> {
        let ids = slice_of(&ids);
        let pieces = py
            .detach(|| self.inner.token_bytes(&ids))
            .map_err(to_pyerr)?;
        Ok(pieces.iter().map(|p| PyBytes::new(py, p)).collect())
    }

    /// The states of every segment of every (input_ids <u4, labels <i4, seg_offsets
    /// <i8 [S+1]) triple, in one pass without the GIL: `segment` <i8 [N] (index over
    /// all triples), `offsets` <i8 [N+1] into `states` <i8 (segment-relative token
    /// positions), `terminal` bool [N] (the last state is the end-of-turn token).
    fn split<'py>(
        &self,
        py: Python<'py>,
        arrays: Vec<(
            PyReadonlyArray1<'py, u32>,
            PyReadonlyArray1<'py, i32>,
            PyReadonlyArray1<'py, i64>,
        )>,
        delimiter: &[u8],
    ) -> PyResult<Bound<'py, PyDict>> {
        let held: Vec<_> = arrays
            .iter()
            .map(|(i, l, o)| (slice_of(i), slice_of(l), slice_of(o)))
            .collect();
        let views: Vec<(&[u32], &[i32], &[i64])> = held
            .iter()
            .map(|(i, l, o)| (&i[..], &l[..], &o[..]))
            .collect();
        let out = py
            .detach(|| self.inner.split(&views, delimiter))
            .map_err(to_pyerr)?;
        let d = PyDict::new(py);
        d.set_item("segment", PyArray1::from_vec(py, out.segment))?;
        d.set_item("offsets", PyArray1::from_vec(py, out.offsets))?;
        d.set_item("states", PyArray1::from_vec(py, out.states))?;
        d.set_item("terminal", PyArray1::from_vec(py, out.terminal))?;
        Ok(d)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<PyEncoder>()?;
    m.add_class::<PyStepSplitter>()?;
    m.add_class::<PyPreparer>()?;
    m.add_function(wrap_pyfunction!(detect_format, m)?)?;
    m.add_function(wrap_pyfunction!(pack_bfd, m)?)?;
    m.add_function(wrap_pyfunction!(write_shards, m)?)?;
    Ok(())
}
