//! Typed arguments as tuples, carried on the wire as a JSON object keyed by parameter name.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Why a JSON argument object did not match a task's parameters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ArgsError {
    /// `args` is not a JSON object.
    #[error("arguments must be a JSON object keyed by parameter name, got {0}")]
    NotAnObject(&'static str),
    /// A required parameter has no value.
    #[error("missing argument `{0}`")]
    Missing(&'static str),
    /// A value has the wrong type or shape.
    #[error("argument `{name}`: {message}")]
    Invalid {
        /// Parameter name.
        name: &'static str,
        /// What serde said.
        message: String,
    },
    /// Keys that match no parameter.
    #[error("unknown argument(s) {unknown:?}; the task takes {expected:?}")]
    Unknown {
        /// The extra keys.
        unknown: Vec<String>,
        /// The parameter names.
        expected: Vec<&'static str>,
    },
    /// A value could not be encoded at enqueue.
    #[error("argument `{name}` cannot be encoded as JSON: {message}")]
    Encode {
        /// Parameter name.
        name: &'static str,
        /// What serde said.
        message: String,
    },
}

/// A tuple of task arguments.
pub trait TaskArgs: Sized + Send + 'static {
    /// Encode as a JSON object with `names` as keys.
    fn to_json(&self, names: &'static [&'static str]) -> Result<Value, ArgsError>;
    /// Decode from a JSON object with `names` as keys.
    fn from_json(args: &Value, names: &'static [&'static str]) -> Result<Self, ArgsError>;
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn object<'a>(args: &'a Value, names: &'static [&'static str]) -> Result<&'a Map<String, Value>, ArgsError> {
    let map = match args {
        Value::Object(m) => m,
        other => return Err(ArgsError::NotAnObject(kind_of(other))),
    };
    if map.len() > names.len() || map.keys().any(|k| !names.contains(&k.as_str())) {
        let unknown: Vec<String> = map.keys().filter(|k| !names.contains(&k.as_str())).cloned().collect();
        if !unknown.is_empty() {
            return Err(ArgsError::Unknown { unknown, expected: names.to_vec() });
        }
    }
    Ok(map)
}

fn field<T: DeserializeOwned>(map: &Map<String, Value>, name: &'static str) -> Result<T, ArgsError> {
    static NULL: Value = Value::Null;
    let value = map.get(name).unwrap_or(&NULL);
    T::deserialize(value).map_err(|e| {
        if value.is_null() && !map.contains_key(name) {
            ArgsError::Missing(name)
        } else {
            ArgsError::Invalid { name, message: e.to_string() }
        }
    })
}

fn encode<T: Serialize>(v: &T, name: &'static str) -> Result<Value, ArgsError> {
    serde_json::to_value(v).map_err(|e| ArgsError::Encode { name, message: e.to_string() })
}

fn name_at(names: &'static [&'static str], i: usize) -> &'static str {
    names.get(i).copied().unwrap_or("?")
}

macro_rules! tuple_args {
    ($($ty:ident $idx:tt),*) => {
        impl<$($ty),*> TaskArgs for ($($ty,)*)
        where
            $($ty: Serialize + DeserializeOwned + Send + 'static,)*
        {
            #[allow(unused_variables, unused_mut)]
            fn to_json(&self, names: &'static [&'static str]) -> Result<Value, ArgsError> {
                let mut map = Map::new();
                $( map.insert(name_at(names, $idx).to_owned(), encode(&self.$idx, name_at(names, $idx))?); )*
                Ok(Value::Object(map))
            }

            #[allow(unused_variables)]
            fn from_json(args: &Value, names: &'static [&'static str]) -> Result<Self, ArgsError> {
                let map = object(args, names)?;
                Ok(($( field::<$ty>(map, name_at(names, $idx))?, )*))
            }
        }
    };
}

tuple_args!();
tuple_args!(A 0);
tuple_args!(A 0, B 1);
tuple_args!(A 0, B 1, C 2);
tuple_args!(A 0, B 1, C 2, D 3);
tuple_args!(A 0, B 1, C 2, D 3, E 4);
tuple_args!(A 0, B 1, C 2, D 3, E 4, F 5);
tuple_args!(A 0, B 1, C 2, D 3, E 4, F 5, G 6);
tuple_args!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);
tuple_args!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8);
tuple_args!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9);
tuple_args!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10);
tuple_args!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7, I 8, J 9, K 10, L 11);

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const NAMES: &[&str] = &["to", "count", "cc"];

    #[test]
    fn round_trip_by_name() {
        let args = ("a@b.c".to_owned(), 3u32, Some("x".to_owned()));
        let v = args.to_json(NAMES).unwrap();
        assert_eq!(v, json!({"to": "a@b.c", "count": 3, "cc": "x"}));
        let back = <(String, u32, Option<String>)>::from_json(&v, NAMES).unwrap();
        assert_eq!(back, args);
    }

    #[test]
    fn optional_args_may_be_missing() {
        let back =
            <(String, u32, Option<String>)>::from_json(&json!({"to": "x", "count": 1}), NAMES).unwrap();
        assert_eq!(back.2, None);
    }

    #[test]
    fn clear_errors() {
        type A = (String, u32, Option<String>);
        assert_eq!(A::from_json(&json!({"count": 1}), NAMES), Err(ArgsError::Missing("to")));
        let e = A::from_json(&json!({"to": 5, "count": 1}), NAMES).unwrap_err();
        assert!(matches!(e, ArgsError::Invalid { name: "to", .. }), "{e}");
        assert!(e.to_string().contains("argument `to`"));
        let e = A::from_json(&json!({"to": "x", "count": 1, "bcc": 2}), NAMES).unwrap_err();
        assert!(matches!(e, ArgsError::Unknown { .. }));
        assert_eq!(A::from_json(&json!([1]), NAMES), Err(ArgsError::NotAnObject("an array")));
    }
}
