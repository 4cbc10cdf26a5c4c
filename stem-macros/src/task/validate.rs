//! Check that the function can be a task and build the [`TaskSig`] the expansion works from.
//!
//! Every refusal is spanned at the offending token: `fn` for a missing `async`, the generics,
//! the receiver, the borrowed type, the misplaced `TaskContext`.

use syn::{FnArg, GenericArgument, Ident, ItemFn, Pat, PathArguments, ReturnType, Type};

use super::Errors;

/// Arguments a task can take besides the context (the runtime implements `TaskArgs` for
/// tuples up to this length).
const MAX_ARGS: usize = 12;

/// The checked signature.
pub(crate) struct TaskSig<'a> {
    /// Whether the first parameter is the `TaskContext`.
    pub(crate) takes_context: bool,
    /// The JSON arguments, in order.
    pub(crate) args: Vec<Arg<'a>>,
    /// What the function returns.
    pub(crate) output: Output<'a>,
}

/// One JSON argument.
pub(crate) struct Arg<'a> {
    /// Its name (a JSON key).
    pub(crate) ident: &'a Ident,
    /// Its type, as written.
    pub(crate) ty: &'a Type,
}

/// The function's return type.
pub(crate) enum Output<'a> {
    /// No return type: the task outputs `()`.
    Unit,
    /// A `Result` (or an alias whose name ends in `Result`): errors convert to `TaskError`.
    Result(&'a Type),
    /// Any other type: always a success.
    Plain(&'a Type),
}

/// Check `func`; `None` if it cannot be expanded (the errors are in `errors`).
pub(crate) fn check<'a>(func: &'a ItemFn, errors: &mut Errors) -> Option<TaskSig<'a>> {
    let sig = &func.sig;
    let mut errs = Errors::default();

    if let Some(token) = &sig.constness {
        errs.at(token, "`#[task]` cannot be used on a `const fn`");
    }
    if let Some(token) = &sig.unsafety {
        errs.at(
            token,
            "`#[task]` functions cannot be `unsafe`: a worker calls them with no caller to uphold a contract",
        );
    }
    if let Some(abi) = &sig.abi {
        errs.at(abi, "`#[task]` functions cannot be `extern`");
    }
    if sig.asyncness.is_none() && sig.constness.is_none() {
        errs.at(sig.fn_token, "`#[task]` functions must be `async`: write `async fn`");
    }
    if !sig.generics.params.is_empty() {
        errs.at(&sig.generics,
            "`#[task]` functions cannot be generic: arguments are decoded from JSON, so their types must be concrete",
        );
    } else if let Some(where_clause) = &sig.generics.where_clause {
        errs.at(where_clause, "`#[task]` functions cannot have a `where` clause");
    }
    if let Some(variadic) = &sig.variadic {
        errs.at(variadic, "`#[task]` functions cannot be variadic");
    }

    let mut takes_context = false;
    let mut args = Vec::new();
    for (index, input) in sig.inputs.iter().enumerate() {
        let typed = match input {
            FnArg::Receiver(receiver) => {
                errs.at(receiver,
                    "`#[task]` cannot take `self`: a worker runs the task with only its arguments; use a free function",
                );
                continue;
            }
            FnArg::Typed(typed) => typed,
        };
        let ty = &*typed.ty;

        if is_context(ty) {
            if index == 0 {
                takes_context = true;
            } else {
                errs.at(ty, "`TaskContext` must be the first parameter");
            }
            continue;
        }
        if let Type::Reference(r) = ty
            && is_context(&r.elem)
        {
            errs.at(ty, "take the context by value: `ctx: TaskContext` (it is cheap to clone)");
            continue;
        }

        let ident = match &*typed.pat {
            Pat::Ident(p) if p.by_ref.is_none() && p.subpat.is_none() => &p.ident,
            pat => {
                errs.at(pat,
                    "task parameters must be plain names, such as `a: i64`: each name is the key of a JSON argument",
                );
                continue;
            }
        };
        if !check_owned(ty, &mut errs) {
            continue;
        }
        args.push(Arg { ident, ty });
    }
    if args.len() > MAX_ARGS
        && let Some(extra) = args.get(MAX_ARGS)
    {
        errs.at(extra.ident, format!("a task takes at most {MAX_ARGS} arguments besides the `TaskContext`"));
    }

    let output = match &sig.output {
        ReturnType::Default => Output::Unit,
        ReturnType::Type(_, ty) => {
            if let Some(bad) = find_impl_trait(ty) {
                errs.at(
                    bad,
                    "a task cannot return `impl Trait`: name the output type, it is decoded from JSON",
                );
                Output::Unit
            } else if let Some(borrow) = find_borrow(ty) {
                let message = "task outputs must be owned because they are stored as JSON; \
                               return e.g. `String` instead of `&str`";
                match borrow {
                    Borrow::Reference(r) => errs.at(r, message),
                    Borrow::Lifetime(l) => errs.at(l, message),
                }
                Output::Unit
            } else if is_result(ty) {
                Output::Result(ty)
            } else {
                Output::Plain(ty)
            }
        }
    };

    match errs.finish() {
        Some(err) => {
            errors.push(err);
            None
        }
        None => Some(TaskSig { takes_context, args, output }),
    }
}

/// Whether the last path segment is `TaskContext`.
fn is_context(ty: &Type) -> bool {
    last_segment(ty).is_some_and(|s| s.ident == "TaskContext")
}

/// Whether the type is `Result<..>` or an alias named `..Result`.
fn is_result(ty: &Type) -> bool {
    last_segment(ty).is_some_and(|s| s.ident.to_string().ends_with("Result"))
}

fn last_segment(ty: &Type) -> Option<&syn::PathSegment> {
    match ty {
        Type::Path(p) if p.qself.is_none() => p.path.segments.last(),
        Type::Group(g) => last_segment(&g.elem),
        Type::Paren(p) => last_segment(&p.elem),
        _ => None,
    }
}

/// Refuse borrowed and `impl Trait` argument types; `false` when an error was recorded.
fn check_owned(ty: &Type, errors: &mut Errors) -> bool {
    if let Some(bad) = find_impl_trait(ty) {
        errors.at(bad, "task arguments cannot be `impl Trait`: use a concrete type, it is decoded from JSON");
        return false;
    }
    if let Some(borrow) = find_borrow(ty) {
        let message = match borrow {
            Borrow::Reference(r) => format!(
                "task arguments must be owned because they are decoded from JSON; use `{}` instead of `{}`",
                owned_hint(r),
                tokens_text(r)
            ),
            Borrow::Lifetime(_) => "task arguments must be owned because they are decoded from JSON; \
                                    use a type without lifetimes, e.g. `String` instead of `&str`"
                .to_owned(),
        };
        match borrow {
            Borrow::Reference(r) => errors.at(r, message),
            Borrow::Lifetime(l) => errors.at(l, message),
        }
        return false;
    }
    true
}

enum Borrow<'a> {
    Reference(&'a syn::TypeReference),
    Lifetime(&'a syn::Lifetime),
}

/// The owned type to suggest for a reference: `&str` → `String`, `&[T]` → `Vec<T>`, `&T` → `T`.
fn owned_hint(r: &syn::TypeReference) -> String {
    match &*r.elem {
        Type::Path(p) if p.path.is_ident("str") => "String".to_owned(),
        Type::Path(p) if p.path.is_ident("Path") => "PathBuf".to_owned(),
        Type::Slice(s) => format!("Vec<{}>", tokens_text(&s.elem)),
        other => tokens_text(other),
    }
}

/// Tokens as the user would write them (`&'a str`, `Vec<u8>`), for messages.
fn tokens_text(tokens: &dyn quote::ToTokens) -> String {
    let mut text = quote::quote!(#tokens).to_string();
    for (from, to) in
        [(" < ", "<"), ("< ", "<"), (" >", ">"), (" , ", ", "), ("& ", "&"), (" :: ", "::"), ("' ", "'")]
    {
        text = text.replace(from, to);
    }
    text
}

fn find_borrow(ty: &Type) -> Option<Borrow<'_>> {
    match ty {
        Type::Reference(r) => Some(Borrow::Reference(r)),
        Type::Path(p) => {
            if let Some(q) = &p.qself
                && let Some(b) = find_borrow(&q.ty)
            {
                return Some(b);
            }
            p.path.segments.iter().find_map(|seg| match &seg.arguments {
                PathArguments::AngleBracketed(args) => args.args.iter().find_map(|arg| match arg {
                    GenericArgument::Lifetime(l) if l.ident != "static" => Some(Borrow::Lifetime(l)),
                    GenericArgument::Type(t) => find_borrow(t),
                    _ => None,
                }),
                PathArguments::Parenthesized(args) => args.inputs.iter().find_map(find_borrow),
                PathArguments::None => None,
            })
        }
        Type::Tuple(t) => t.elems.iter().find_map(find_borrow),
        Type::Array(a) => find_borrow(&a.elem),
        Type::Slice(s) => find_borrow(&s.elem),
        Type::Paren(p) => find_borrow(&p.elem),
        Type::Group(g) => find_borrow(&g.elem),
        Type::TraitObject(t) => t.bounds.iter().find_map(|b| match b {
            syn::TypeParamBound::Lifetime(l) if l.ident != "static" => Some(Borrow::Lifetime(l)),
            _ => None,
        }),
        _ => None,
    }
}

fn find_impl_trait(ty: &Type) -> Option<&Type> {
    match ty {
        Type::ImplTrait(_) => Some(ty),
        Type::Reference(r) => find_impl_trait(&r.elem),
        Type::Path(p) => p.path.segments.iter().find_map(|seg| match &seg.arguments {
            PathArguments::AngleBracketed(args) => args.args.iter().find_map(|arg| match arg {
                GenericArgument::Type(t) => find_impl_trait(t),
                _ => None,
            }),
            _ => None,
        }),
        Type::Tuple(t) => t.elems.iter().find_map(find_impl_trait),
        Type::Array(a) => find_impl_trait(&a.elem),
        Type::Slice(s) => find_impl_trait(&s.elem),
        Type::Paren(p) => find_impl_trait(&p.elem),
        Type::Group(g) => find_impl_trait(&g.elem),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use syn::parse_quote;

    use super::*;

    fn messages(func: ItemFn) -> Vec<String> {
        let mut errors = Errors::default();
        let sig = check(&func, &mut errors);
        let errors: Vec<String> = errors.finish().into_iter().flatten().map(|e| e.to_string()).collect();
        assert_eq!(sig.is_none(), !errors.is_empty());
        errors
    }

    #[test]
    fn accepts_context_and_result() {
        let func: ItemFn = parse_quote! {
            async fn add(ctx: stem::TaskContext, a: i64, b: Vec<String>) -> Result<i64, TaskError> { todo!() }
        };
        let mut errors = Errors::default();
        let sig = check(&func, &mut errors).unwrap();
        assert!(errors.finish().is_none());
        assert!(sig.takes_context);
        assert_eq!(sig.args.iter().map(|a| a.ident.to_string()).collect::<Vec<_>>(), ["a", "b"]);
        assert!(matches!(sig.output, Output::Result(_)));
    }

    #[test]
    fn refuses_bad_signatures() {
        assert_eq!(
            messages(parse_quote!(
                fn f() {}
            )),
            ["`#[task]` functions must be `async`: write `async fn`"]
        );
        assert!(
            messages(parse_quote!(
                async fn f<T>(t: T) {}
            ))[0]
                .contains("cannot be generic")
        );
        assert!(
            messages(parse_quote!(
                async fn f(&self) {}
            ))[0]
                .contains("cannot take `self`")
        );
        assert_eq!(
            messages(parse_quote!(
                async fn f(s: &str) {}
            )),
            [
                "task arguments must be owned because they are decoded from JSON; use `String` instead of `&str`"
            ]
        );
        assert!(
            messages(parse_quote!(
                async fn f(s: Cow<'a, str>) {}
            ))[0]
                .contains("must be owned")
        );
        assert!(
            messages(parse_quote!(
                async fn f(s: impl Into<String>) {}
            ))[0]
                .contains("`impl Trait`")
        );
        assert!(
            messages(parse_quote!(
                async fn f((a, b): (i64, i64)) {}
            ))[0]
                .contains("plain names")
        );
        assert_eq!(
            messages(parse_quote!(
                async fn f(a: i64, ctx: TaskContext) {}
            )),
            ["`TaskContext` must be the first parameter"]
        );
    }
}
