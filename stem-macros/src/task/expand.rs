//! Generate the marker struct, its `new` constructor, the `Task` impl and the registry entry.
//!
//! The expansion is small and the same for every task: options become one const-fn chain,
//! and decoding, encoding, retries and acks live in the runtime (`run_erased::<T>`).

use proc_macro2::{Literal, Span, TokenStream};
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::ext::IdentExt;
use syn::spanned::Spanned;
use syn::{ItemFn, Type};

use super::attr::{Setting, TaskAttr, Value};
use super::validate::{Output, TaskSig};

/// The function, untouched, followed by everything that makes it a task.
pub(crate) fn expand(func: &ItemFn, attr: &TaskAttr, sig: &TaskSig<'_>) -> TokenStream {
    let root = match &attr.krate {
        Some(path) => path.to_token_stream(),
        None => quote!(::stem),
    };
    let p = quote!(#root::__private);
    let vis = &func.vis;
    let ident = &func.sig.ident;
    let fn_name = ident.unraw().to_string();
    // `#[cfg]`s on the function also guard what is generated for it.
    let cfgs: Vec<_> = func.attrs.iter().filter(|a| a.path().is_ident("cfg")).collect();

    let name = match &attr.name {
        Some(lit) => lit.to_token_stream(),
        None => quote!(::core::concat!(::core::module_path!(), "::", #fn_name)),
    };
    let doc = match &attr.name {
        Some(lit) => {
            let text = format!("Stem task `{}`; `{fn_name}::new(..)` builds a typed call.", lit.value());
            quote!(#text)
        }
        None => quote! {
            ::core::concat!("Stem task `", ::core::module_path!(), "::", #fn_name, "`; `", #fn_name, "::new(..)` builds a typed call.")
        },
    };

    let arg_idents: Vec<_> = sig.args.iter().map(|a| a.ident).collect();
    let params: Vec<_> = sig.args.iter().map(|a| a.ident.unraw().to_string()).collect();
    let new_params = sig.args.iter().map(|a| {
        let ident = a.ident;
        if is_string(a.ty) {
            quote!(#ident: impl ::core::convert::Into<::std::string::String>)
        } else {
            let ty = a.ty;
            quote!(#ident: #ty)
        }
    });
    let new_values = sig.args.iter().map(|a| {
        let ident = a.ident;
        if is_string(a.ty) { quote!(::core::convert::Into::into(#ident)) } else { quote!(#ident) }
    });
    let arg_types: Vec<_> = sig.args.iter().map(|a| checked(&p, a.ty, quote!(check_arg))).collect();
    let partial = partial(&p, vis, ident, &cfgs, sig, &arg_types);

    let (output, convert) = match &sig.output {
        Output::Unit => (quote!(()), quote!(#p::ok)),
        Output::Plain(ty) => (checked(&p, ty, quote!(check_output)), quote!(#p::ok)),
        Output::Result(ty) => {
            // Point failed checks at `T` and `E` in `Result<T, E>` when they are written out.
            let (ok_span, err_span) = match type_args(ty).as_slice() {
                [ok, err, ..] => (ok.span(), err.span()),
                [ok] => (ok.span(), ty.span()),
                [] => (ty.span(), ty.span()),
            };
            let result = checked_at(&p, ty, quote!(check_result), err_span);
            let inner: Type = syn::parse_quote_spanned!(ok_span=> <#result as #p::IntoTaskResult>::Output);
            (checked_at(&p, &inner, quote!(check_output), ok_span), quote!(#p::into_result::<#result>))
        }
    };

    let options = attr.settings.iter().map(|s| setter(&p, s));

    // Local names of `run`, hygienic so they never clash with the user's parameter names.
    let ctx = mixed("__stem_ctx");
    let args = mixed("__stem_args");
    let (ctx_param, ctx_arg) =
        if sig.takes_context { (quote!(#ctx), quote!(#ctx,)) } else { (quote!(_), quote!()) };
    // Spanned at the function's name: a non-`Send` future is reported as "future returned by
    // `add` is not `Send`" with the caret on `add`.
    let call = quote_spanned! {ident.span()=>
        #p::assert_send(#ident(#ctx_arg #(#arg_idents),*))
    };
    let line = quote_spanned!(ident.span()=> ::core::line!());

    quote! {
        #func

        #(#cfgs)*
        #[allow(non_camel_case_types, dead_code)]
        #[doc = #doc]
        #vis struct #ident {}

        #(#cfgs)*
        impl #ident {
            /// A typed call of this task, ready to enqueue.
            #[allow(dead_code, clippy::new_ret_no_self, clippy::too_many_arguments)]
            #vis fn new(#(#new_params),*) -> #p::Signature<#ident> {
                #p::Signature::new((#(#new_values,)*))
            }
        }

        #partial

        #(#cfgs)*
        const _: () = {
            #[automatically_derived]
            impl #p::Task for #ident {
                type Args = (#(#arg_types,)*);
                type Output = #output;
                const NAME: &'static str = #name;
                const PARAMS: &'static [&'static str] = &[#(#params),*];
                const OPTIONS: #p::TaskOptions = #p::TaskOptions::new() #(#options)*;

                fn run(
                    #ctx_param: #p::TaskContext,
                    #args: Self::Args,
                ) -> impl ::core::future::Future<
                    Output = ::core::result::Result<Self::Output, #p::TaskError>,
                > + ::core::marker::Send {
                    let (#(#arg_idents,)*) = #args;
                    async move { #convert(#call.await) }
                }
            }

            #p::submit_task! {
                #p::TaskEntry::of::<#ident>(::core::module_path!(), ::core::file!(), #line)
            }
        };
    }
}

/// For a task with a first parameter: `name::partial(rest..)`, a call missing its first
/// argument (which the previous step of a canvas chain fills), and the `PartialTask` impl
/// naming that parameter's type, so `canvas!` chains are type-checked step by step.
fn partial(
    p: &TokenStream,
    vis: &syn::Visibility,
    ident: &syn::Ident,
    cfgs: &[&syn::Attribute],
    sig: &TaskSig<'_>,
    arg_types: &[TokenStream],
) -> TokenStream {
    let (Some(first), Some(_)) = (arg_types.first(), sig.args.first()) else {
        // No parameter to fill: `partial()` exists only so that `canvas!` reports "cannot run
        // after a step whose output is ..., mark it `~`" instead of a missing function.
        return quote! {
            #(#cfgs)*
            impl #ident {
                #[doc(hidden)]
                #[allow(dead_code)]
                #vis fn partial() -> #p::NoParameters<#ident> {
                    #p::NoParameters::new()
                }
            }
        };
    };
    let rest = &sig.args[1..];
    let rest_types = &arg_types[1..];
    let params = rest.iter().map(|a| param(a.ident, a.ty));
    let values = rest.iter().map(|a| value(a.ident, a.ty));
    quote! {
        #(#cfgs)*
        impl #ident {
            /// A typed call of this task missing its first argument: in a canvas chain, the
            /// previous step's output fills it.
            #[allow(dead_code, clippy::too_many_arguments)]
            #vis fn partial(#(#params),*) -> #p::Partial<#ident> {
                #p::Partial::new((#(#values,)*))
            }
        }

        #(#cfgs)*
        const _: () = {
            #[automatically_derived]
            impl #p::PartialTask for #ident {
                type First = #first;
                type Rest = (#(#rest_types,)*);
            }
        };
    }
}

/// A constructor parameter: `String`s are taken as `impl Into<String>`.
fn param(ident: &syn::Ident, ty: &Type) -> TokenStream {
    if is_string(ty) {
        quote!(#ident: impl ::core::convert::Into<::std::string::String>)
    } else {
        quote!(#ident: #ty)
    }
}

/// The value passed on for a constructor parameter.
fn value(ident: &syn::Ident, ty: &Type) -> TokenStream {
    if is_string(ty) { quote!(::core::convert::Into::into(#ident)) } else { quote!(#ident) }
}

/// `ty`, routed through a compile-time check spanned at `ty`:
/// `<ty as Checked<{ check::<ty>() }>>::Ty`. A failing check is one error at the user's type,
/// and the type becomes an error type so the `Task` impl adds no follow-up errors.
fn checked(p: &TokenStream, ty: &Type, check: TokenStream) -> TokenStream {
    checked_at(p, ty, check, ty.span())
}

/// [`checked`], with the check's tokens spanned at `span`.
fn checked_at(p: &TokenStream, ty: &Type, check: TokenStream, span: Span) -> TokenStream {
    quote_spanned! {span=>
        <#ty as #p::Checked<{ #p::#check::<#ty>() }>>::Ty
    }
}

/// `.key(value)` on `TaskOptions`.
fn setter(p: &TokenStream, setting: &Setting) -> TokenStream {
    let key = &setting.key;
    let value = match &setting.value {
        Value::U32(n, span) => spanned_lit(Literal::u32_unsuffixed(*n), *span),
        Value::U8(n, span) => spanned_lit(Literal::u8_unsuffixed(*n), *span),
        Value::Str(lit) => lit.to_token_stream(),
        Value::Bool(b, span) => quote_spanned!(*span=> #b),
        Value::Millis(ms, span) => {
            let ms = Literal::u64_unsuffixed(*ms);
            quote_spanned!(*span=> ::core::time::Duration::from_millis(#ms))
        }
        Value::RateLimit(count, secs, span) => {
            let count = Literal::u32_unsuffixed(*count);
            let secs = Literal::u64_unsuffixed(*secs);
            quote_spanned!(*span=> #p::RateLimit::new(#count, ::core::time::Duration::from_secs(#secs)))
        }
        Value::StrList(kinds, span) => quote_spanned!(*span=> &[#(#kinds),*]),
    };
    quote!(.#key(#value))
}

fn spanned_lit(mut lit: Literal, span: Span) -> TokenStream {
    lit.set_span(span);
    lit.into_token_stream()
}

/// The type arguments of the last segment: `[T, E]` in `Result<T, E>`, `[T]` in `MyResult<T>`.
fn type_args(ty: &Type) -> Vec<&Type> {
    let Type::Path(p) = ty else { return Vec::new() };
    let Some(syn::PathArguments::AngleBracketed(args)) = p.path.segments.last().map(|s| &s.arguments) else {
        return Vec::new();
    };
    args.args
        .iter()
        .filter_map(|a| match a {
            syn::GenericArgument::Type(t) => Some(t),
            _ => None,
        })
        .collect()
}

/// Whether the type is spelled `String` (`new` then takes `impl Into<String>`).
fn is_string(ty: &Type) -> bool {
    match ty {
        Type::Path(p) if p.qself.is_none() => {
            p.path.segments.last().is_some_and(|s| s.ident == "String" && s.arguments.is_none())
        }
        Type::Group(g) => is_string(&g.elem),
        _ => false,
    }
}

/// An identifier for a generated local, invisible to the user's code (mixed-site hygiene).
fn mixed(name: &str) -> syn::Ident {
    format_ident!("{}", name, span = Span::mixed_site())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use quote::quote;

    fn expand(attr: proc_macro2::TokenStream, item: proc_macro2::TokenStream) -> String {
        super::super::expand(attr, item).to_string()
    }

    #[test]
    fn default_name_is_module_path_and_fn() {
        let out = expand(
            quote!(),
            quote!(
                async fn add(a: i64, b: i64) -> i64 {
                    a + b
                }
            ),
        );
        assert!(out.contains(r#"const NAME : & 'static str = :: core :: concat ! (:: core :: module_path ! () , "::" , "add")"#), "{out}");
        assert!(out.contains(r#"const PARAMS : & 'static [& 'static str] = & ["a" , "b"]"#), "{out}");
        assert!(out.contains(":: stem :: __private :: ok"), "{out}");
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn options_become_a_const_chain() {
        let out = expand(
            quote!(
                name = "math.add",
                retries = 3,
                queue = "math",
                soft_time_limit = "1m",
                rate_limit = "5/h",
                crate = "facade::stem"
            ),
            quote!(
                pub async fn add(ctx: TaskContext, a: i64, b: String) -> Result<i64, TaskError> {
                    Ok(a)
                }
            ),
        );
        assert!(out.contains(r#"const NAME : & 'static str = "math.add""#), "{out}");
        assert!(out.contains(
            r#"facade :: stem :: __private :: TaskOptions :: new () . retries (3) . queue ("math") . soft_time_limit (:: core :: time :: Duration :: from_millis (60000)) . rate_limit (facade :: stem :: __private :: RateLimit :: new (5 , :: core :: time :: Duration :: from_secs (3600)))"#
        ), "{out}");
        assert!(
            out.contains(
                "pub fn new (a : i64 , b : impl :: core :: convert :: Into < :: std :: string :: String >)"
            ),
            "{out}"
        );
        assert!(out.contains("facade :: stem :: __private :: into_result :: <"), "{out}");
        assert!(!out.replace("facade :: stem", "").contains("stem ::"), "{out}");
    }
}
