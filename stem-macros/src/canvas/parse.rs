//! The grammar of `canvas!`:
//!
//! ```text
//! canvas  := element
//! element := chain[element, ..] | group[element, ..] | chord[element, ..] => element
//!          | ~task(args..)                    immutable: ignores the previous output
//!          | task(args..)[.option(..)]*       partial after a step, else a full call
//!          | expression                       any typed canvas piece (`add::new(1, 2)`, a variable)
//! ```
//!
//! The model keeps the original tokens so errors span them.

use proc_macro2::Span;
use syn::parse::{Parse, ParseStream};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, Ident, Token, bracketed};

/// The whole input.
pub(crate) struct Canvas {
    pub(crate) root: Element,
}

/// One element of a canvas.
pub(crate) enum Element {
    /// `chain[..]`.
    Chain(List),
    /// `group[..]`.
    Group(List),
    /// `chord[..] => body`.
    Chord(List, Box<Element>),
    /// A task call or another expression; `tilde` marks it immutable.
    Call { tilde: Option<Token![~]>, expr: Expr },
}

/// A bracketed list after `chain`, `group` or `chord`.
pub(crate) struct List {
    pub(crate) keyword: Ident,
    /// The brackets (for "empty" errors).
    pub(crate) brackets: Span,
    pub(crate) items: Vec<Element>,
}

impl Element {
    /// Where errors about this element point: its first token.
    pub(crate) fn span(&self) -> Span {
        match self {
            Element::Chain(l) | Element::Group(l) | Element::Chord(l, _) => l.keyword.span(),
            Element::Call { tilde: Some(t), .. } => t.span,
            Element::Call { tilde: None, expr } => expr.span(),
        }
    }
}

impl Parse for Canvas {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let root = input.parse()?;
        if !input.is_empty() {
            return Err(
                input.error("unexpected token after the canvas; write one element, e.g. `chain[a(1), b()]`")
            );
        }
        Ok(Canvas { root })
    }
}

const KEYWORDS: [&str; 3] = ["chain", "group", "chord"];

impl Parse for Element {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        if input.peek(Token![~]) {
            let tilde: Token![~] = input.parse()?;
            let expr: Expr = input.parse()?;
            return Ok(Element::Call { tilde: Some(tilde), expr });
        }
        if input.peek(Ident) && input.peek2(syn::token::Bracket) {
            let is_keyword = input.fork().parse::<Ident>().is_ok_and(|k| KEYWORDS.iter().any(|w| k == w));
            if is_keyword {
                let keyword: Ident = input.parse()?;
                let content;
                let brackets = bracketed!(content in input);
                let items: Punctuated<Element, Token![,]> =
                    content.parse_terminated(Element::parse, Token![,])?;
                let list =
                    List { keyword, brackets: brackets.span.join(), items: items.into_iter().collect() };
                return Ok(match list.keyword.to_string().as_str() {
                    "chain" => Element::Chain(list),
                    "group" => Element::Group(list),
                    _ => {
                        if !input.peek(Token![=>]) {
                            return Err(input.error(
                                "expected `=>` and the chord's callback, e.g. `chord[a(1), a(2)] => sum()`",
                            ));
                        }
                        input.parse::<Token![=>]>()?;
                        Element::Chord(list, Box::new(input.parse()?))
                    }
                });
            }
        }
        Ok(Element::Call { tilde: None, expr: input.parse()? })
    }
}

/// Cross-element checks: no empty lists, `~` only before a task call.
pub(crate) fn validate(canvas: &Canvas) -> syn::Result<()> {
    let mut errors: Option<syn::Error> = None;
    check(&canvas.root, &mut errors);
    errors.map_or(Ok(()), Err)
}

fn check(element: &Element, errors: &mut Option<syn::Error>) {
    let mut push = |err: syn::Error| match errors {
        Some(e) => e.combine(err),
        None => *errors = Some(err),
    };
    match element {
        Element::Chain(list) | Element::Group(list) | Element::Chord(list, _) => {
            if list.items.is_empty() {
                let kw = &list.keyword;
                push(syn::Error::new(
                    list.brackets,
                    format!("an empty `{kw}[]` has nothing to run; give it at least one element"),
                ));
            }
        }
        Element::Call { tilde: Some(tilde), expr } if shorthand(expr).is_none() => push(syn::Error::new(
            tilde.span,
            "`~` marks a task call as immutable, e.g. `~add(1, 2)`; it goes before `task(args..)`",
        )),
        Element::Call { .. } => {}
    }
    match element {
        Element::Chain(list) | Element::Group(list) => list.items.iter().for_each(|i| check(i, errors)),
        Element::Chord(list, body) => {
            list.items.iter().for_each(|i| check(i, errors));
            check(body, errors);
        }
        Element::Call { .. } => {}
    }
}

/// The task path of a shorthand call `task(args..)` (possibly followed by `.option(..)`
/// calls): a call of a plain path whose last segment is not `new` or `partial` (those are the
/// generated constructors, passed through as they are).
pub(crate) fn shorthand(expr: &Expr) -> Option<&syn::ExprPath> {
    match expr {
        Expr::Call(call) => match &*call.func {
            Expr::Path(path)
                if path.qself.is_none()
                    && path
                        .path
                        .segments
                        .last()
                        .is_some_and(|s| s.ident != "new" && s.ident != "partial") =>
            {
                Some(path)
            }
            _ => None,
        },
        Expr::MethodCall(m) => shorthand(&m.receiver),
        _ => None,
    }
}
