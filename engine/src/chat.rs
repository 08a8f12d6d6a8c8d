//! Chat templates: the GGUF's `tokenizer.chat_template` rendered with minijinja the way
//! llama-cpp-python's `Jinja2ChatFormatter` and transformers' `apply_chat_template` render it
//! with jinja2:
//! - `trim_blocks` and `lstrip_blocks` on, the trailing newline of the template dropped;
//! - `break` / `continue` (jinja2.ext.loopcontrols);
//! - Python string / dict / list methods (`.strip()`, `.items()`, …) through minijinja-contrib's
//!   pycompat;
//! - `raise_exception(msg)`, `strftime_now(fmt)` and a `tojson` filter that writes what Python's
//!   `json.dumps(x, ensure_ascii=False, indent=…, separators=…, sort_keys=…)` writes;
//! - the variables llama-cpp-python passes: `messages`, `add_generation_prompt`, `bos_token`,
//!   `eos_token`, and `tools`, `tool_choice`, `functions`, `function_call` set to none.
//!
//! Not supported: transformers' `{% generation %}` tag (minijinja has no custom tags).

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::gguf::GgufFile;

/// One chat message. Field order matters to templates that `tojson` a message: role, content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage { role: role.into(), content: content.into() }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("chat template does not parse: {0}")]
    Syntax(String),
    #[error("chat template failed while rendering: {0}")]
    Render(String),
    #[error("chat template raised an exception: {0}")]
    Raised(String),
}

/// The GGUF's `tokenizer.chat_template`, if it has one.
pub fn template_of(f: &GgufFile) -> Option<&str> {
    f.meta("tokenizer.chat_template").and_then(|v| v.as_str())
}

const RAISED_PREFIX: &str = "raise_exception: ";

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, format!("{RAISED_PREFIX}{msg}")))
    });
    env.add_function("strftime_now", |fmt: String| -> Result<String, Error> { Ok(strftime_now(&fmt)) });
    env.add_filter("tojson", tojson);
    // Python prints True / False / None where minijinja prints true / false / none.
    env.set_formatter(|out, state, value| match value.kind() {
        ValueKind::Bool => out.write_str(if value.is_true() { "True" } else { "False" }).map_err(Error::from),
        ValueKind::None => out.write_str("None").map_err(Error::from),
        _ => minijinja::escape_formatter(out, state, value),
    });
    env
}

/// Renders `template` over `messages`.
pub fn render(template: &str, messages: &[ChatMessage], add_generation_prompt: bool, bos_token: &str, eos_token: &str) -> Result<String, ChatError> {
    let mut env = environment();
    env.add_template_owned("chat_template", template.to_string()).map_err(|e| ChatError::Syntax(format!("{e:#}")))?;
    let tmpl = env.get_template("chat_template").map_err(|e| ChatError::Syntax(format!("{e:#}")))?;
    let ctx = minijinja::context! {
        messages => Value::from_serialize(messages),
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
        tools => Value::from(()),
        tool_choice => Value::from(()),
        functions => Value::from(()),
        function_call => Value::from(()),
    };
    tmpl.render(ctx).map_err(|e| {
        let detail = e.detail().unwrap_or_default();
        if let Some(msg) = detail.strip_prefix(RAISED_PREFIX) {
            ChatError::Raised(msg.to_string())
        } else {
            ChatError::Render(format!("{e:#}"))
        }
    })
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<Value> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Value> = kwargs.get("separators")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?; // always False in the transformers filter
    kwargs.assert_all_used()?;
    let indent: Option<String> = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.kind() {
            ValueKind::Number => Some(" ".repeat(v.as_i64().unwrap_or(0).max(0) as usize)),
            ValueKind::String => Some(v.as_str().unwrap_or("").to_string()),
            _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: indent must be an int or a string")),
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(s) if !s.is_none() && !s.is_undefined() => {
            let a = s.get_item_by_index(0)?;
            let b = s.get_item_by_index(1)?;
            match (a.as_str(), b.as_str()) {
                (Some(a), Some(b)) => (a.to_string(), b.to_string()),
                _ => return Err(Error::new(ErrorKind::InvalidOperation, "tojson: separators must be two strings")),
            }
        }
        // Python's defaults: ', ' without indent, ',' with one.
        _ => (if indent.is_some() { "," } else { ", " }.to_string(), ": ".to_string()),
    };
    let mut out = String::new();
    let opts = JsonOpts { indent, item_sep, key_sep, sort_keys: sort_keys.unwrap_or(false) };
    write_json(&value, &opts, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

struct JsonOpts {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

fn newline(opts: &JsonOpts, level: usize, out: &mut String) {
    if let Some(ind) = &opts.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(ind);
        }
    }
}

fn write_json(v: &Value, opts: &JsonOpts, level: usize, out: &mut String) -> Result<(), Error> {
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else {
                let f: f64 = f64::try_from(v.clone())?;
                out.push_str(&python_float_repr(f));
            }
        }
        ValueKind::String => write_json_str(v.as_str().unwrap_or(""), out),
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            if opts.sort_keys {
                keys.sort();
            }
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(opts, level + 1, out);
                // Python converts str / int / float / bool / None keys to strings.
                match k.as_str() {
                    Some(s) => write_json_str(s, out),
                    None => write_json_str(&k.to_string(), out),
                }
                out.push_str(&opts.key_sep);
                write_json(&v.get_item(k)?, opts, level + 1, out)?;
            }
            newline(opts, level, out);
            out.push('}');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(opts, level + 1, out);
                write_json(item, opts, level + 1, out)?;
            }
            newline(opts, level, out);
            out.push(']');
        }
        _ => return Err(Error::new(ErrorKind::InvalidOperation, format!("tojson: a value of kind {:?} is not JSON serializable", v.kind()))),
    }
    Ok(())
}

/// A JSON string as Python's json module writes it with ensure_ascii=False.
fn write_json_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)` (what json.dumps writes): shortest round-trip digits, exponent form
/// below 1e-4 and from 1e16 up, "Infinity" / "NaN" as json.dumps allows them.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    let a = f.abs();
    if a != 0.0 && !(1e-4..1e16).contains(&a) {
        // Rust's {:e} gives the shortest digits, e.g. "1e-7", "1.5e16"; Python writes "1e-07", "1.5e+16".
        let s = format!("{f:e}");
        let (mant, exp) = s.split_once('e').expect("{:e} always has an exponent");
        let exp: i32 = exp.parse().expect("{:e} exponent is an integer");
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mant}e{sign}{:02}", exp.abs());
    }
    let s = format!("{f}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

/// `datetime.now().strftime(fmt)` for the directives chat templates use (%d %m %Y %y %b %B %a %A
/// %H %M %S %j %%), in UTC: the engine has no time-zone database.
fn strftime_now(fmt: &str) -> String {
    let secs = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    strftime(secs, fmt)
}

/// Python's `strftime(fmt)` of a UTC Unix time, for the directives listed at [`strftime_now`]
/// (hand-written: civil-from-days is a dozen lines, smaller than a date crate).
pub fn strftime(unix_secs: i64, fmt: &str) -> String {
    const MONTHS: [&str; 12] = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = unix_secs.div_euclid(86_400);
    let sod = unix_secs.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy_mar = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy_mar + 2) / 153;
    let day = doy_mar - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7); // 1970-01-01 was a Thursday (Monday = 0)
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('Y') => out.push_str(&format!("{year}")),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('b') => out.push_str(&MONTHS[(month - 1) as usize][..3]),
            Some('B') => out.push_str(MONTHS[(month - 1) as usize]),
            Some('a') => out.push_str(&DAYS[weekday as usize][..3]),
            Some('A') => out.push_str(DAYS[weekday as usize]),
            Some('H') => out.push_str(&format!("{:02}", sod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", sod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", sod % 60)),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(o) => {
                out.push('%');
                out.push(o);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<ChatMessage> {
        pairs.iter().map(|(r, c)| ChatMessage::new(*r, *c)).collect()
    }

    #[test]
    fn trim_and_lstrip_blocks_like_jinja2() {
        let t = "{% for m in messages %}\n    {% if m.role == 'user' %}\n[{{ m.content }}]\n    {% endif %}\n{% endfor %}\n";
        let out = render(t, &msgs(&[("user", "a"), ("bot", "b"), ("user", "c")]), false, "", "").unwrap();
        assert_eq!(out, "[a]\n[c]\n");
    }

    #[test]
    fn loop_controls_and_python_methods() {
        let t = "{% for m in messages %}{% if loop.index0 == 2 %}{% break %}{% endif %}{{ m.content.strip().upper() }}|{% endfor %}";
        let out = render(t, &msgs(&[("u", "  x "), ("u", "y\n"), ("u", "z")]), false, "", "").unwrap();
        assert_eq!(out, "X|Y|");
    }

    #[test]
    fn raise_exception_is_a_typed_error() {
        let t = "{% if messages[0].role != 'system' %}{{ raise_exception('need a system message') }}{% endif %}";
        match render(t, &msgs(&[("user", "hi")]), true, "", "") {
            Err(ChatError::Raised(m)) => assert_eq!(m, "need a system message"),
            other => panic!("expected Raised, got {other:?}"),
        }
    }

    #[test]
    fn syntax_error_is_reported() {
        assert!(matches!(render("{% for %}", &[], true, "", ""), Err(ChatError::Syntax(_))));
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        // json.dumps({"role": "user", "content": "a<b>&'\"é\n"}, ensure_ascii=False)
        let t = "{{ messages[0] | tojson }}";
        let out = render(t, &msgs(&[("user", "a<b>&'\"é\n")]), false, "", "").unwrap();
        assert_eq!(out, r#"{"role": "user", "content": "a<b>&'\"é\n"}"#);
        let t = "{{ messages | tojson(indent=2) }}";
        let out = render(t, &msgs(&[("u", "x")]), false, "", "").unwrap();
        assert_eq!(out, "[\n  {\n    \"role\": \"u\",\n    \"content\": \"x\"\n  }\n]");
        assert_eq!(python_float_repr(1.0), "1.0");
        assert_eq!(python_float_repr(0.1), "0.1");
        assert_eq!(python_float_repr(1e-7), "1e-07");
        assert_eq!(python_float_repr(1.5e16), "1.5e+16");
    }

    #[test]
    fn undefined_and_none_variables_like_llama_cpp_python() {
        let t =
            "{% if tools %}T{% endif %}{% if tools is none %}N{% endif %}{% if messages[0].tool_calls %}C{% endif %}{{ bos_token }}{{ add_generation_prompt }}";
        assert_eq!(render(t, &msgs(&[("u", "x")]), true, "<s>", "</s>").unwrap(), "N<s>True");
    }

    #[test]
    fn strftime_known_dates() {
        assert_eq!(strftime(0, "%d %b %Y %H:%M:%S %A %j"), "01 Jan 1970 00:00:00 Thursday 001");
        // 2024-02-29 12:34:56 UTC
        assert_eq!(strftime(1_709_210_096, "%Y-%m-%d %H:%M:%S %a %B %j %%"), "2024-02-29 12:34:56 Thu February 060 %");
    }
}
