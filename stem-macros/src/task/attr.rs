//! Parse `#[task(...)]` options into [`TaskAttr`].
//!
//! Simple checks (value types, duration and rate-limit syntax, ranges, duplicates, unknown
//! keys) happen here, each error spanned at the offending key or value. Parsing goes on after
//! an error so that every mistake is reported at once.

use proc_macro2::{Span, TokenStream};
use syn::meta::ParseNestedMeta;
use syn::parse::Parser;
use syn::{Expr, Lit, LitStr};

use super::Errors;

/// Every option `#[task]` accepts, in the order the "unknown option" message lists them.
pub(crate) const OPTIONS: &[&str] = &[
    "name",
    "retries",
    "queue",
    "priority",
    "soft_time_limit",
    "hard_time_limit",
    "visibility_timeout",
    "expires",
    "backoff_base",
    "backoff_max",
    "backoff_jitter",
    "ignore_result",
    "rate_limit",
    "retry_for",
    "crate",
];

/// Options whose value is a duration.
const DURATIONS: &[&str] =
    &["soft_time_limit", "hard_time_limit", "visibility_timeout", "expires", "backoff_base", "backoff_max"];

/// Keys people reach for that mean one of ours.
const HINTS: &[(&str, &str)] = &[
    ("max_retries", "retries"),
    ("retry", "retries"),
    ("time_limit", "hard_time_limit"),
    ("timeout", "hard_time_limit"),
    ("soft_timeout", "soft_time_limit"),
    ("expires_in", "expires"),
    ("ttl", "expires"),
    ("routing_key", "queue"),
    ("jitter", "backoff_jitter"),
    ("autoretry_for", "retry_for"),
    ("krate", "crate"),
];

/// The parsed `#[task(...)]` arguments.
#[derive(Default)]
pub(crate) struct TaskAttr {
    /// `name = ".."`; `None` means `module_path!()::fn_name`.
    pub(crate) name: Option<LitStr>,
    /// `crate = ".."`; `None` means `::stem`.
    pub(crate) krate: Option<syn::Path>,
    /// Every other option, in source order, as one `TaskOptions` setter call each.
    pub(crate) settings: Vec<Setting>,
}

/// One `TaskOptions` setter: `.key(value)`.
pub(crate) struct Setting {
    /// The option key as written (its span is the key's).
    pub(crate) key: syn::Ident,
    /// The checked value.
    pub(crate) value: Value,
}

/// A checked option value; `span` is the value's, so type errors land on it.
pub(crate) enum Value {
    /// `retries = 3`.
    U32(u32, Span),
    /// `priority = 5`.
    U8(u8, Span),
    /// `queue = "math"`.
    Str(LitStr),
    /// `ignore_result = true`.
    Bool(bool, Span),
    /// A duration, in milliseconds.
    Millis(u64, Span),
    /// `rate_limit = "10/s"`: count and period in seconds.
    RateLimit(u32, u64, Span),
    /// `retry_for = ["io", "timeout"]`.
    StrList(Vec<LitStr>, Span),
}

/// Parse the attribute arguments, recording every error in `errors`.
pub(crate) fn parse(attr: TokenStream, errors: &mut Errors) -> TaskAttr {
    let mut out = TaskAttr::default();
    let mut seen: Vec<String> = Vec::new();
    let parser = syn::meta::parser(|meta| parse_one(meta, &mut out, &mut seen, errors));
    if let Err(err) = parser.parse2(attr) {
        errors.push(err);
    }
    out
}

fn parse_one(
    meta: ParseNestedMeta<'_>,
    out: &mut TaskAttr,
    seen: &mut Vec<String>,
    errors: &mut Errors,
) -> syn::Result<()> {
    let key = match meta.path.get_ident() {
        Some(ident) => ident.to_string(),
        None => {
            errors.at(&meta.path, unknown_message(&path_text(&meta.path)));
            return skip_value(&meta);
        }
    };
    let Some(&known) = OPTIONS.iter().find(|o| **o == key) else {
        errors.at(&meta.path, unknown_message(&key));
        return skip_value(&meta);
    };
    if seen.iter().any(|s| s == known) {
        errors.at(&meta.path, format!("`{known}` is specified more than once"));
        return skip_value(&meta);
    }
    seen.push(known.to_owned());

    let key_ident =
        syn::Ident::new(known, meta.path.segments.first().map_or(Span::call_site(), |s| s.ident.span()));

    // Bare boolean flags: `#[task(ignore_result)]`.
    if matches!(known, "backoff_jitter" | "ignore_result") && !meta.input.peek(syn::Token![=]) {
        let span = key_ident.span();
        out.settings.push(Setting { key: key_ident, value: Value::Bool(true, span) });
        return Ok(());
    }

    let value: Expr = meta.value()?.parse()?;
    let result = match known {
        "name" => string(&value, known, "name = \"math.add\"").and_then(|lit| {
            if lit.value().is_empty() {
                Err(syn::Error::new(lit.span(), "`name` must not be empty"))
            } else {
                out.name = Some(lit);
                Ok(())
            }
        }),
        "crate" => string(&value, known, "crate = \"my_facade::stem\"").and_then(|lit| {
            let path = lit.parse_with(syn::Path::parse_mod_style).map_err(|_| {
                syn::Error::new(lit.span(), format!("`crate` expects a path such as \"::stem\", got {:?}", lit.value()))
            })?;
            out.krate = Some(path);
            Ok(())
        }),
        "retries" => integer::<u32>(&value, known, "retries = 3").map(|(n, span)| Value::U32(n, span)).map(push(out, &key_ident)),
        "priority" => integer::<u8>(&value, known, "priority = 5").and_then(|(n, span)| {
            if n > 9 {
                Err(syn::Error::new(span, format!("`priority` must be between 0 and 9, got {n}")))
            } else {
                push(out, &key_ident)(Value::U8(n, span));
                Ok(())
            }
        }),
        "queue" => string(&value, known, "queue = \"emails\"").and_then(|lit| {
            if lit.value().is_empty() {
                Err(syn::Error::new(lit.span(), "`queue` must not be empty"))
            } else {
                push(out, &key_ident)(Value::Str(lit));
                Ok(())
            }
        }),
        "backoff_jitter" | "ignore_result" => boolean(&value, known).map(|(b, span)| Value::Bool(b, span)).map(push(out, &key_ident)),
        "rate_limit" => string(&value, known, "rate_limit = \"10/s\"").and_then(|lit| {
            let (count, secs) = parse_rate_limit(&lit.value()).ok_or_else(|| {
                syn::Error::new(
                    lit.span(),
                    format!(
                        "invalid rate limit {:?}: expected \"N/s\", \"N/m\" or \"N/h\" (at most N task starts per second, minute or hour, N ≥ 1), e.g. \"10/s\"",
                        lit.value()
                    ),
                )
            })?;
            push(out, &key_ident)(Value::RateLimit(count, secs, lit.span()));
            Ok(())
        }),
        "retry_for" => string_list(&value).map(|(list, span)| Value::StrList(list, span)).map(push(out, &key_ident)),
        _ if DURATIONS.contains(&known) => duration(&value, known).map(|(ms, span)| Value::Millis(ms, span)).map(push(out, &key_ident)),
        _ => Ok(()),
    };
    if let Err(err) = result {
        errors.push(err);
    }
    Ok(())
}

/// A closure that appends `.key(value)`.
fn push<'a>(out: &'a mut TaskAttr, key: &'a syn::Ident) -> impl FnOnce(Value) + 'a {
    move |value| out.settings.push(Setting { key: key.clone(), value })
}

fn unknown_message(key: &str) -> String {
    let list = OPTIONS.iter().map(|o| format!("`{o}`")).collect::<Vec<_>>().join(", ");
    let hint = HINTS
        .iter()
        .find(|(wrong, _)| *wrong == key)
        .map(|(_, right)| format!(" (did you mean `{right}`?)"))
        .unwrap_or_default();
    format!("unknown `#[task]` option `{key}`{hint}; expected one of: {list}")
}

fn path_text(path: &syn::Path) -> String {
    path.segments.iter().map(|s| s.ident.to_string()).collect::<Vec<_>>().join("::")
}

/// Consume the value of an option we are not going to use, so parsing can go on.
fn skip_value(meta: &ParseNestedMeta<'_>) -> syn::Result<()> {
    if meta.input.peek(syn::Token![=]) {
        let _: Expr = meta.value()?.parse()?;
    } else if meta.input.peek(syn::token::Paren) {
        let _: proc_macro2::TokenTree = meta.input.parse()?;
    }
    Ok(())
}

fn lit(value: &Expr) -> Option<&Lit> {
    match value {
        Expr::Lit(e) => Some(&e.lit),
        Expr::Group(g) => lit(&g.expr),
        _ => None,
    }
}

fn wrong_type(value: &Expr, message: String) -> syn::Error {
    syn::Error::new_spanned(value, message)
}

fn string(value: &Expr, key: &str, example: &str) -> syn::Result<LitStr> {
    match lit(value) {
        Some(Lit::Str(s)) => Ok(s.clone()),
        _ => Err(wrong_type(value, format!("`{key}` expects a string literal, e.g. `{example}`"))),
    }
}

fn integer<N>(value: &Expr, key: &str, example: &str) -> syn::Result<(N, Span)>
where
    N: std::str::FromStr,
    N::Err: std::fmt::Display,
{
    match lit(value) {
        Some(Lit::Int(i)) => {
            let n = i.base10_parse::<N>().map_err(|_| {
                syn::Error::new(i.span(), format!("`{key}` is out of range: {}", i.base10_digits()))
            })?;
            Ok((n, i.span()))
        }
        _ => Err(wrong_type(value, format!("`{key}` expects an integer, e.g. `{example}`"))),
    }
}

fn boolean(value: &Expr, key: &str) -> syn::Result<(bool, Span)> {
    match lit(value) {
        Some(Lit::Bool(b)) => Ok((b.value, b.span)),
        _ => Err(wrong_type(value, format!("`{key}` expects `true` or `false`, e.g. `{key} = true`"))),
    }
}

fn string_list(value: &Expr) -> syn::Result<(Vec<LitStr>, Span)> {
    let message = "`retry_for` expects an array of error kinds, e.g. `retry_for = [\"io\", \"timeout\"]`";
    let Expr::Array(array) = value else {
        return Err(wrong_type(value, message.to_owned()));
    };
    let mut kinds = Vec::with_capacity(array.elems.len());
    for elem in &array.elems {
        match lit(elem) {
            Some(Lit::Str(s)) => kinds.push(s.clone()),
            _ => return Err(wrong_type(elem, message.to_owned())),
        }
    }
    Ok((kinds, array.bracket_token.span.join()))
}

fn duration(value: &Expr, key: &str) -> syn::Result<(u64, Span)> {
    let bad = |span: Span, text: &str| {
        syn::Error::new(
            span,
            format!(
                "invalid duration {text} for `{key}`: expected a string like \"500ms\", \"30s\", \"5m\" or \"1h\", or an integer number of seconds"
            ),
        )
    };
    match lit(value) {
        Some(Lit::Int(i)) => {
            let secs: u64 = i.base10_parse().map_err(|_| bad(i.span(), i.base10_digits()))?;
            let ms = secs.checked_mul(1000).ok_or_else(|| bad(i.span(), i.base10_digits()))?;
            Ok((ms, i.span()))
        }
        Some(Lit::Str(s)) => {
            let text = s.value();
            parse_duration_ms(&text)
                .map(|ms| (ms, s.span()))
                .ok_or_else(|| bad(s.span(), &format!("{text:?}")))
        }
        _ => Err(wrong_type(
            value,
            format!("`{key}` expects a duration, e.g. `{key} = \"30s\"` or `{key} = 30`"),
        )),
    }
}

/// `"500ms" | "30s" | "5m" | "1h"` → milliseconds.
pub(crate) fn parse_duration_ms(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let factor = match unit.trim() {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => return None,
    };
    n.checked_mul(factor)
}

/// `"N/s" | "N/m" | "N/h"` → (N, period in seconds); N must be at least 1.
pub(crate) fn parse_rate_limit(text: &str) -> Option<(u32, u64)> {
    let (count, unit) = text.split_once('/')?;
    let count: u32 = count.trim().parse().ok()?;
    if count == 0 {
        return None;
    }
    let secs = match unit.trim() {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        _ => return None,
    };
    Some((count, secs))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use quote::quote;

    use super::*;

    fn parse_ok(tokens: TokenStream) -> TaskAttr {
        let mut errors = Errors::default();
        let attr = parse(tokens, &mut errors);
        if let Some(err) = errors.finish() {
            panic!("unexpected error: {err}");
        }
        attr
    }

    fn parse_err(tokens: TokenStream) -> Vec<String> {
        let mut errors = Errors::default();
        let _ = parse(tokens, &mut errors);
        errors.finish().expect("an error").into_iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn parses_every_kind_of_option() {
        let attr = parse_ok(quote!(
            name = "math.add",
            retries = 3,
            queue = "math",
            priority = 9,
            soft_time_limit = "500ms",
            hard_time_limit = 30,
            backoff_jitter = false,
            ignore_result,
            rate_limit = "10/m",
            retry_for = ["io", "timeout"],
            crate = "my_facade::stem"
        ));
        assert_eq!(attr.name.unwrap().value(), "math.add");
        let krate = attr.krate.unwrap();
        assert_eq!(quote!(#krate).to_string(), "my_facade :: stem");
        let keys: Vec<String> = attr.settings.iter().map(|s| s.key.to_string()).collect();
        assert_eq!(
            keys,
            [
                "retries",
                "queue",
                "priority",
                "soft_time_limit",
                "hard_time_limit",
                "backoff_jitter",
                "ignore_result",
                "rate_limit",
                "retry_for"
            ]
        );
        assert!(matches!(attr.settings[0].value, Value::U32(3, _)));
        assert!(matches!(attr.settings[3].value, Value::Millis(500, _)));
        assert!(matches!(attr.settings[4].value, Value::Millis(30_000, _)));
        assert!(matches!(attr.settings[5].value, Value::Bool(false, _)));
        assert!(matches!(attr.settings[6].value, Value::Bool(true, _)));
        assert!(matches!(attr.settings[7].value, Value::RateLimit(10, 60, _)));
        assert!(matches!(&attr.settings[8].value, Value::StrList(l, _) if l.len() == 2));
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration_ms("500ms"), Some(500));
        assert_eq!(parse_duration_ms("30s"), Some(30_000));
        assert_eq!(parse_duration_ms("5m"), Some(300_000));
        assert_eq!(parse_duration_ms("1h"), Some(3_600_000));
        assert_eq!(parse_duration_ms("0s"), Some(0));
        assert_eq!(parse_duration_ms("30"), None);
        assert_eq!(parse_duration_ms("s"), None);
        assert_eq!(parse_duration_ms("5d"), None);
        assert_eq!(parse_duration_ms("-5s"), None);
        assert_eq!(parse_duration_ms("99999999999999999h"), None);
    }

    #[test]
    fn parses_rate_limits() {
        assert_eq!(parse_rate_limit("10/s"), Some((10, 1)));
        assert_eq!(parse_rate_limit("5/m"), Some((5, 60)));
        assert_eq!(parse_rate_limit("2/h"), Some((2, 3600)));
        assert_eq!(parse_rate_limit("0/s"), None);
        assert_eq!(parse_rate_limit("10"), None);
        assert_eq!(parse_rate_limit("10/d"), None);
        assert_eq!(parse_rate_limit("x/s"), None);
    }

    #[test]
    fn reports_every_mistake() {
        let errors = parse_err(quote!(
            retrys = 3,
            retries = "3",
            queue = "a",
            queue = "b",
            priority = 12,
            expires = "5 days",
            rate_limit = "ten per second",
            max_retries = 1
        ));
        assert_eq!(errors.len(), 7, "{errors:#?}");
        assert!(
            errors[0].starts_with("unknown `#[task]` option `retrys`; expected one of: `name`, `retries`")
        );
        assert!(errors[0].ends_with("`retry_for`, `crate`"));
        assert_eq!(errors[1], "`retries` expects an integer, e.g. `retries = 3`");
        assert_eq!(errors[2], "`queue` is specified more than once");
        assert_eq!(errors[3], "`priority` must be between 0 and 9, got 12");
        assert!(errors[4].starts_with("invalid duration \"5 days\" for `expires`"));
        assert!(errors[5].contains("expected \"N/s\", \"N/m\" or \"N/h\""));
        assert!(errors[6].contains("(did you mean `retries`?)"));
    }

    #[test]
    fn syntax_errors_are_reported() {
        let errors = parse_err(quote!(retries 3));
        assert_eq!(errors.len(), 1, "{errors:#?}");
    }
}
