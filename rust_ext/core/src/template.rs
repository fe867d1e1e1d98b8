//! Chat templates rendered as transformers renders them (`render_jinja_template`
//! in `transformers/utils/chat_template_utils.py`), with minijinja:
//!
//! - environment: `trim_blocks=True, lstrip_blocks=True`, loop controls
//!   (`break`/`continue`), a single trailing newline of the source dropped
//!   (Jinja2's `keep_trailing_newline=False`);
//! - globals `raise_exception`, `strftime_now`, `namespace`, `dict`; filter
//!   `tojson` as `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
//!   sort_keys=False)` (no HTML escaping);
//! - Python string/dict methods (`.strip()`, `.startswith()`, `.items()`, ...)
//!   through `minijinja_contrib::pycompat`;
//! - context: `messages`, `tools=None`, `documents=None`, `add_generation_prompt`,
//!   the tokenizer's named special tokens (`bos_token`, `eos_token`, ...) and a
//!   row's template variables (`Vars`: its `tools`, `documents`, ...), which
//!   override them, as `apply_chat_template(tools=..., documents=..., **kwargs)`;
//! - `{% generation %}...{% endgeneration %}` (transformers' assistant-mask
//!   extension) renders its body unchanged and records its span in the output
//!   (`render_marked`), as transformers' `AssistantTracker` does;
//! - `strftime_now` in the wall-clock time `set_clock` fixes (local time, as
//!   transformers' `datetime.now()`), read once so every row sees the same date.
use std::collections::BTreeMap;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Rest, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

use crate::error::{CoreError, Result};

const NAME: &str = "chat_template";
const RAISED: &str = "\u{1}raise_exception\u{1}";
/// Emitted where a generation block opens / closes and stripped after rendering:
/// Unicode noncharacters, which no text is meant to hold.
const GEN_OPEN: char = '\u{FDD0}';
const GEN_CLOSE: char = '\u{FDD1}';

/// Template variables of one row beyond `messages` (`tools`, `documents`, ...).
pub type Vars = BTreeMap<String, Value>;

/// A compiled chat template plus the special tokens it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    specials: BTreeMap<String, Value>,
    generation: bool,
}

impl ChatTemplate {
    /// Compile `source`. `specials` are the tokenizer's named special tokens
    /// (`("bos_token", "<s>")`, ...), visible to the template as variables.
    pub fn new(source: &str, specials: &[(String, String)]) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| CoreError::Template(format!("chat template syntax config: {e}")))?,
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        let rewritten = rewrite_generation_tags(source);
        let generation = rewritten != source;
        env.add_template_owned(NAME.to_string(), rewritten)
            .map_err(|e| {
                CoreError::Template(format!("chat template does not parse: {}", describe(&e)))
            })?;
        let specials = specials
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.as_str())))
            .collect();
        Ok(Self {
            env,
            specials,
            generation,
        })
    }

    /// Fix the time `strftime_now` renders: `local_secs` is the wall clock as
    /// seconds since 1970-01-01 00:00 in the local zone (UTC seconds + the UTC
    /// offset). Without it, `strftime_now` reads the clock at each call, in UTC.
    pub fn set_clock(&mut self, local_secs: i64) {
        self.env.add_function("strftime_now", move |fmt: String| {
            strftime(local_secs, &fmt)
        });
    }

    /// Whether the template has `{% generation %}` blocks.
    pub fn has_generation(&self) -> bool {
        self.generation
    }

    /// Render `messages` (each a map value, as `Value::from(Serde(json))` makes
    /// it). Errors are `CoreError::Template` with the template's own message
    /// for `raise_exception(...)`.
    pub fn render(&self, messages: &[Value], add_generation_prompt: bool) -> Result<String> {
        self.render_with(messages, add_generation_prompt, &Vars::new())
    }

    /// `render` with a row's template variables.
    pub fn render_with(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        vars: &Vars,
    ) -> Result<String> {
        Ok(self.render_marked(messages, add_generation_prompt, vars)?.0)
    }

    /// Render and return the byte spans of the output that `{% generation %}`
    /// blocks produced, in order of their opening (transformers'
    /// `generation_indices`, in bytes instead of characters).
    pub fn render_marked(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        vars: &Vars,
    ) -> Result<(String, Vec<(usize, usize)>)> {
        let mut ctx = self.specials.clone();
        ctx.insert("tools".into(), Value::from(()));
        ctx.insert("documents".into(), Value::from(()));
        for (k, v) in vars {
            ctx.insert(k.clone(), v.clone());
        }
        ctx.insert("messages".into(), Value::from(messages.to_vec()));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| CoreError::Template(describe(&e)))?;
        let text = tmpl
            .render(Value::from(ctx))
            .map_err(|e| CoreError::Template(render_error(&e)))?;
        if !self.generation {
            return Ok((text, Vec::new()));
        }
        strip_generation_marks(&text)
    }
}

/// Remove the generation sentinels from `marked`, returning the text and the
/// (start, end) byte span of every block, nested ones included.
fn strip_generation_marks(marked: &str) -> Result<(String, Vec<(usize, usize)>)> {
    let mut text = String::with_capacity(marked.len());
    let mut spans: Vec<(usize, usize)> = Vec::new();
    let mut open: Vec<usize> = Vec::new(); // indices into spans
    for c in marked.chars() {
        match c {
            GEN_OPEN => {
                open.push(spans.len());
                spans.push((text.len(), text.len()));
            }
            GEN_CLOSE => {
                let Some(k) = open.pop() else {
                    return Err(CoreError::Template(
                        "chat template: {% endgeneration %} without {% generation %} in the output \
                         (or the text holds U+FDD1)"
                            .into(),
                    ));
                };
                spans[k].1 = text.len();
            }
            c => text.push(c),
        }
    }
    if !open.is_empty() {
        return Err(CoreError::Template(
            "chat template: a {% generation %} block is not closed in the output (or the text holds U+FDD0)"
                .into(),
        ));
    }
    Ok((text, spans))
}

fn render_error(e: &Error) -> String {
    if let Some(msg) = e.detail().and_then(|d| d.strip_prefix(RAISED)) {
        return format!("chat template raised an exception: {msg}");
    }
    format!("chat template failed to render: {}", describe(e))
}

fn describe(e: &Error) -> String {
    let mut s = match e.detail() {
        Some(d) => format!("{}: {}", e.kind(), d),
        None => e.kind().to_string(),
    };
    if let Some(line) = e.line() {
        s.push_str(&format!(" (template line {line})"));
    }
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(&format!("; {inner}"));
        src = inner.source();
    }
    s
}

fn raise_exception(msg: String) -> std::result::Result<Value, Error> {
    Err(Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{msg}"),
    ))
}

/// `{% generation %}` / `{% endgeneration %}` become an empty block that emits
/// a sentinel, `{% if true %}{{ '\u{FDD0}' }}{% endif %}`, keeping the
/// whitespace-control marks (the opening one on the `if`, the closing one on the
/// `endif`) so that trim_blocks and lstrip_blocks act on them exactly as on the
/// original tags.
pub fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(pos) = rest.find("{%") {
        out.push_str(&rest[..pos]);
        let tag = &rest[pos..];
        match parse_generation_tag(tag) {
            Some((len, open_mark, is_end, close_mark)) => {
                let mark = if is_end { GEN_CLOSE } else { GEN_OPEN };
                out.push_str(&format!(
                    "{{%{open_mark} if true %}}{{{{ '{mark}' }}}}{{% endif {close_mark}%}}"
                ));
                rest = &tag[len..];
            }
            None => {
                out.push_str("{%");
                rest = &tag[2..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Parse `{%[-+]? (end)?generation [-+]?%}` at the start of `s`:
/// (length, opening mark, is_end, closing mark).
fn parse_generation_tag(s: &str) -> Option<(usize, &str, bool, &str)> {
    let b = s.as_bytes();
    let mut i = 2;
    let open = if i < b.len() && (b[i] == b'-' || b[i] == b'+') {
        i += 1;
        &s[2..3]
    } else {
        ""
    };
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    let word_start = i;
    while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
        i += 1;
    }
    let is_end = match &s[word_start..i] {
        "generation" => false,
        "endgeneration" => true,
        _ => return None,
    };
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    let close = if i < b.len() && (b[i] == b'-' || b[i] == b'+') {
        i += 1;
        &s[i - 1..i]
    } else {
        ""
    };
    if s[i..].starts_with("%}") {
        Some((i + 2, open, is_end, close))
    } else {
        None
    }
}

// ------------------------------------------------------------------ tojson
/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`; the options may be positional or keywords.
fn tojson(value: Value, args: Rest<Value>, kwargs: Kwargs) -> std::result::Result<Value, Error> {
    let mut opts = [
        Value::from(false),
        Value::from(()),
        Value::from(()),
        Value::from(false),
    ];
    if args.len() > opts.len() {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson takes at most 4 arguments",
        ));
    }
    for (slot, v) in opts.iter_mut().zip(args.iter()) {
        *slot = v.clone();
    }
    for (k, name) in ["ensure_ascii", "indent", "separators", "sort_keys"]
        .iter()
        .enumerate()
    {
        if kwargs.has(name) {
            opts[k] = kwargs.get::<Value>(name)?;
        }
    }
    kwargs.assert_all_used()?;
    let ensure_ascii = opts[0].is_true();
    let indent: Option<String> = match opts[1].kind() {
        ValueKind::None | ValueKind::Undefined => None,
        ValueKind::String => Some(opts[1].as_str().unwrap_or("").to_string()),
        ValueKind::Number => Some(" ".repeat(opts[1].as_i64().unwrap_or(0).max(0) as usize)),
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: indent must be an int or a string",
            ))
        }
    };
    let (item_sep, key_sep) = match opts[2].kind() {
        ValueKind::None | ValueKind::Undefined => (
            if indent.is_some() { "," } else { ", " }.to_string(),
            ": ".to_string(),
        ),
        ValueKind::Seq if opts[2].len() == Some(2) => {
            let a = opts[2].get_item(&Value::from(0))?;
            let b = opts[2].get_item(&Value::from(1))?;
            (
                a.as_str().unwrap_or(",").to_string(),
                b.as_str().unwrap_or(":").to_string(),
            )
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair of strings",
            ))
        }
    };
    let mut w = PyJson {
        out: String::new(),
        indent,
        item_sep,
        key_sep,
        sort_keys: opts[3].is_true(),
        ensure_ascii,
    };
    w.value(&value, 0)?;
    Ok(Value::from_safe_string(w.out))
}

/// A writer producing exactly what Python's `json.dumps` produces.
pub(crate) struct PyJson {
    pub out: String,
    pub indent: Option<String>,
    pub item_sep: String,
    pub key_sep: String,
    pub sort_keys: bool,
    pub ensure_ascii: bool,
}

impl PyJson {
    fn newline(&mut self, depth: usize) {
        if let Some(ind) = &self.indent {
            self.out.push('\n');
            for _ in 0..depth {
                self.out.push_str(ind);
            }
        }
    }

    pub(crate) fn value(&mut self, v: &Value, depth: usize) -> std::result::Result<(), Error> {
        match v.kind() {
            ValueKind::None => self.out.push_str("null"),
            ValueKind::Undefined => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: Object of type Undefined is not JSON serializable",
                ))
            }
            ValueKind::Bool => self
                .out
                .push_str(if v.is_true() { "true" } else { "false" }),
            ValueKind::Number => {
                if v.is_integer() {
                    self.out.push_str(&v.to_string());
                } else {
                    let f = f64::try_from(v.clone())?;
                    self.out.push_str(&py_float_repr(f));
                }
            }
            ValueKind::String | ValueKind::Plain => self.string(&v.to_string()),
            ValueKind::Bytes => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: Object of type bytes is not JSON serializable",
                ))
            }
            ValueKind::Seq | ValueKind::Iterable => {
                let items: Vec<Value> = v.try_iter()?.collect();
                if items.is_empty() {
                    self.out.push_str("[]");
                    return Ok(());
                }
                self.out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        let sep = self.item_sep.clone();
                        self.out.push_str(&sep);
                    }
                    self.newline(depth + 1);
                    self.value(item, depth + 1)?;
                }
                self.newline(depth);
                self.out.push(']');
            }
            ValueKind::Map => {
                let mut keys: Vec<Value> = v.try_iter()?.collect();
                if keys.is_empty() {
                    self.out.push_str("{}");
                    return Ok(());
                }
                if self.sort_keys {
                    keys.sort_by_key(|k| k.to_string());
                }
                self.out.push('{');
                for (i, k) in keys.iter().enumerate() {
                    if i > 0 {
                        let sep = self.item_sep.clone();
                        self.out.push_str(&sep);
                    }
                    self.newline(depth + 1);
                    let ks = match k.kind() {
                        ValueKind::String => k.as_str().unwrap_or("").to_string(),
                        ValueKind::None => "null".into(),
                        ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).into(),
                        _ => k.to_string(),
                    };
                    self.string(&ks);
                    let sep = self.key_sep.clone();
                    self.out.push_str(&sep);
                    self.value(&v.get_item(k)?, depth + 1)?;
                }
                self.newline(depth);
                self.out.push('}');
            }
            ValueKind::Invalid => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    "tojson: invalid value",
                ));
            }
            _ => self.string(&v.to_string()),
        }
        Ok(())
    }

    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                '\u{8}' => self.out.push_str("\\b"),
                '\u{c}' => self.out.push_str("\\f"),
                c if (c as u32) < 0x20 => self.out.push_str(&format!("\\u{:04x}", c as u32)),
                c if self.ensure_ascii && (c as u32) > 0x7e => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        self.out.push_str(&format!("\\u{:04x}", unit));
                    }
                }
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }
}

/// Python's `repr(float)`: shortest round-trip digits, scientific notation
/// when the exponent is < -4 or >= 16.
pub(crate) fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    if f == 0.0 {
        return if f.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    let e = format!("{:e}", f); // e.g. "-1.2345e-7", shortest digits
    let (mant, exp) = e.split_once('e').unwrap();
    let exp: i32 = exp.parse().unwrap();
    let (sign, mant) = if let Some(m) = mant.strip_prefix('-') {
        ("-", m)
    } else {
        ("", mant)
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let s = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if point as usize >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{s}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits
        };
        let es = if exp < 0 {
            format!("-{:02}", -exp)
        } else {
            format!("+{:02}", exp)
        };
        format!("{sign}{m}e{es}")
    }
}

// ------------------------------------------------------------------ strftime_now
/// `datetime.now().strftime(fmt)` for the directives chat templates use
/// (`%d %b %Y` and friends), in UTC.
fn strftime_now(fmt: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    strftime(secs, &fmt)
}

pub(crate) fn strftime(secs: i64, fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let (hh, mm, ss) = (sod / 3600, (sod / 60) % 60, sod % 60);
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&format!("{y}")),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:>2}")),
            Some('B') => out.push_str(MONTHS[(m - 1) as usize]),
            Some('b') | Some('h') => out.push_str(&MONTHS[(m - 1) as usize][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('H') => out.push_str(&format!("{hh:02}")),
            Some('I') => out.push_str(&format!("{:02}", if hh % 12 == 0 { 12 } else { hh % 12 })),
            Some('p') => out.push_str(if hh < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{mm:02}")),
            Some('S') => out.push_str(&format!("{ss:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month, day) (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use minijinja::value::Serde;

    fn msgs(json: &str) -> Vec<Value> {
        let v: Vec<serde_json::Value> = serde_json::from_str(json).unwrap();
        v.into_iter().map(|m| Value::from(Serde(m))).collect()
    }

    const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_chatml() {
        let t = ChatTemplate::new(CHATML, &[]).unwrap();
        let m = msgs(r#"[{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]"#);
        assert_eq!(
            t.render(&m, false).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
        );
        assert_eq!(
            t.render(&m[..1], true).unwrap(),
            "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn trim_and_lstrip_blocks_like_transformers() {
        let src = "{% for m in messages %}\n  {% if m.role == 'user' %}\nU:{{ m.content.strip() }}\n  {% endif %}\n{% endfor %}\n";
        let t = ChatTemplate::new(src, &[]).unwrap();
        let m = msgs(r#"[{"role":"user","content":"  a  "}]"#);
        assert_eq!(t.render(&m, false).unwrap(), "U:a\n");
    }

    #[test]
    fn special_tokens_and_raise_exception() {
        let src = "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system!') }}{% endif %}x";
        let t = ChatTemplate::new(src, &[("bos_token".into(), "<s>".into())]).unwrap();
        assert_eq!(
            t.render(&msgs(r#"[{"role":"user","content":"a"}]"#), false)
                .unwrap(),
            "<s>x"
        );
        let err = t
            .render(&msgs(r#"[{"role":"system","content":"a"}]"#), false)
            .unwrap_err();
        assert!(
            matches!(&err, CoreError::Template(m) if m.contains("no system!")),
            "{err}"
        );
    }

    #[test]
    fn generation_tags_render_their_body() {
        let src = "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{%- endgeneration %}{% else %}{{ m.content }}{% endif %}{% endfor %}";
        let t = ChatTemplate::new(src, &[]).unwrap();
        assert_eq!(
            t.render(
                &msgs(r#"[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]"#),
                false
            )
            .unwrap(),
            "ab"
        );
        assert_eq!(
            rewrite_generation_tags("x{%- generation -%}y{% endgeneration %}"),
            "x{%- if true %}{{ '\u{FDD0}' }}{% endif -%}y{% if true %}{{ '\u{FDD1}' }}{% endif %}"
        );
        assert!(t.has_generation());
        let (text, spans) = t
            .render_marked(
                &msgs(r#"[{"role":"user","content":"a"},{"role":"assistant","content":"bé"},{"role":"assistant","content":"c"}]"#),
                false,
                &Vars::new(),
            )
            .unwrap();
        assert_eq!(text, "abéc");
        assert_eq!(spans, vec![(1, 4), (4, 5)]);
    }

    #[test]
    fn generation_tags_keep_whitespace_control() {
        // trim_blocks drops the newline after each tag, lstrip_blocks the indentation before it
        let src = "{% for m in messages %}\n  {% generation %}\n[{{ m.content }}]\n  {% endgeneration %}\n{% endfor %}";
        let plain = src
            .replace("{% generation %}", "{% if true %}")
            .replace("{% endgeneration %}", "{% endif %}");
        let t = ChatTemplate::new(src, &[]).unwrap();
        let p = ChatTemplate::new(&plain, &[]).unwrap();
        let m = msgs(r#"[{"role":"assistant","content":"x"},{"role":"assistant","content":"y"}]"#);
        let (text, spans) = t.render_marked(&m, false, &Vars::new()).unwrap();
        assert_eq!(text, p.render(&m, false).unwrap());
        assert_eq!(text, "[x]\n[y]\n");
        assert_eq!(spans, vec![(0, 4), (4, 8)]);
    }

    #[test]
    fn vars_and_fixed_clock() {
        let mut t = ChatTemplate::new(
            "{{ strftime_now('%d %b %Y') }}|{{ tools | tojson }}|{{ enable_thinking is defined }}|{{ bos_token }}",
            &[("bos_token".into(), "<s>".into())],
        )
        .unwrap();
        t.set_clock(1_722_000_309);
        let m = msgs(r#"[{"role":"user","content":"a"}]"#);
        assert_eq!(t.render(&m, false).unwrap(), "26 Jul 2024|null|False|<s>");
        let mut vars = Vars::new();
        vars.insert(
            "tools".into(),
            Value::from(Serde(serde_json::json!([{"name": "f"}]))),
        );
        vars.insert("enable_thinking".into(), Value::from(false));
        assert_eq!(
            t.render_with(&m, false, &vars).unwrap(),
            r#"26 Jul 2024|[{"name": "f"}]|True|<s>"#
        );
    }

    #[test]
    fn loop_controls_namespace_and_tojson() {
        let src = "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index0 > 0 %}{% break %}{% endif %}{% set ns.n = ns.n + 1 %}{{ m | tojson }}{% endfor %}{{ ns.n }}";
        let t = ChatTemplate::new(src, &[]).unwrap();
        let out = t.render(&msgs(r#"[{"role":"user","content":"<é>\n","x":1.5,"y":[1,true,null]},{"role":"a","content":"b"}]"#), false).unwrap();
        assert_eq!(
            out,
            r#"{"role": "user", "content": "<é>\n", "x": 1.5, "y": [1, true, null]}1"#
        );
    }

    #[test]
    fn tojson_options() {
        let t = ChatTemplate::new("{{ messages[0] | tojson(indent=2) }}|{{ messages[0] | tojson(separators=(',', ':'), sort_keys=true) }}", &[]).unwrap();
        let out = t.render(&msgs(r#"[{"b":1,"a":[]}]"#), false).unwrap();
        assert_eq!(out, "{\n  \"b\": 1,\n  \"a\": []\n}|{\"a\":[],\"b\":1}");
    }

    #[test]
    fn python_float_repr() {
        for (f, s) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1.5e-5, "1.5e-05"),
            (123456.789, "123456.789"),
            (-2.5, "-2.5"),
            (1e-4, "0.0001"),
            (1234567890123456.0, "1234567890123456.0"),
        ] {
            assert_eq!(py_float_repr(f), s);
        }
    }

    #[test]
    fn strftime_known_date() {
        // 2024-07-26 13:25:09 UTC was a Friday
        assert_eq!(
            strftime(1_722_000_309, "%d %b %Y %H:%M:%S %A %B"),
            "26 Jul 2024 13:25:09 Friday July"
        );
    }

    #[test]
    fn syntax_error_is_a_template_error() {
        assert!(matches!(
            ChatTemplate::new("{% for %}", &[]),
            Err(CoreError::Template(_))
        ));
    }
}
