//! Reading [`Node`] and [`Continuation`] from the wire without buffering.
//!
//! Both are internally tagged (`{"k": "task", ...}`), and serde's derived reader for such
//! enums first copies the whole object into an intermediate tree to find the tag, then reads
//! the variant from that copy. A canvas task's envelope nests them (a chord member carries
//! `member` → `then` → `task` → the callback's envelope), so every level copied everything
//! below it again: reading a chord member's envelope cost several times a plain one's.
//!
//! Stem always writes the tag first (serde's writer does), so these readers look at the first
//! key: if it is the tag, the rest of the object goes straight into the variant's fields.
//! An object written by hand with the tag elsewhere still reads, through a
//! `serde_json::Value` (the slow way, once).

use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

use serde_json::value::RawValue;

use super::plan::{Continuation, Deferred, Node};
use crate::envelope::{Envelope, TaskId};

/// The tag's key.
const TAG: &str = "k";

/// Read an internally tagged object: `K` is the tag's value, `read` builds the variant from a
/// deserializer over the object's other fields.
fn tagged<'de, A, K, T>(
    mut map: A,
    expecting: &'static str,
    read: impl Fn(K, MapAccessDeserializer<A>) -> Result<T, A::Error>,
    read_value: impl Fn(K, Value) -> Result<T, serde_json::Error>,
) -> Result<T, A::Error>
where
    A: MapAccess<'de>,
    K: de::DeserializeOwned,
{
    let Some(first) = map.next_key::<String>()? else {
        return Err(de::Error::missing_field(TAG));
    };
    if first == TAG {
        let kind: K = map.next_value()?;
        return read(kind, MapAccessDeserializer::new(map));
    }
    // The tag is elsewhere: gather the object, then read it.
    let mut object = serde_json::Map::new();
    object.insert(first, map.next_value::<Value>()?);
    while let Some((key, value)) = map.next_entry::<String, Value>()? {
        object.insert(key, value);
    }
    let Some(tag) = object.remove(TAG) else {
        return Err(de::Error::missing_field(TAG));
    };
    let kind = K::deserialize(tag).map_err(|e| de::Error::custom(format_args!("{expecting}: {e}")))?;
    read_value(kind, Value::Object(object)).map_err(de::Error::custom)
}

/// An internally tagged enum read by [`tagged`].
trait TaggedEnum: Sized {
    /// The tag's values.
    type Kind: de::DeserializeOwned;
    /// What it is, for messages.
    const WHAT: &'static str;
    /// The variant `kind` from a deserializer over the object's other fields.
    fn read<'de, D: Deserializer<'de>>(kind: Self::Kind, d: D) -> Result<Self, D::Error>;
}

struct TagFirst<T>(std::marker::PhantomData<T>);

impl<'de, T: TaggedEnum> Visitor<'de> for TagFirst<T> {
    type Value = T;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "a {} (an object tagged \"{TAG}\")", T::WHAT)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
        tagged(map, T::WHAT, T::read, T::read)
    }
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(TagFirst::<Node>(std::marker::PhantomData))
    }
}

impl<'de> Deserialize<'de> for Continuation {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(TagFirst::<Continuation>(std::marker::PhantomData))
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum NodeKind {
    Task,
    Chain,
    Group,
    Linked,
}

#[derive(serde::Deserialize)]
struct TaskFields {
    env: Box<Envelope>,
    #[serde(default)]
    receives: Option<String>,
    #[serde(default)]
    countdown_ms: Option<u64>,
}

#[derive(serde::Deserialize)]
struct ChainFields {
    steps: Vec<Node>,
}

#[derive(serde::Deserialize)]
struct GroupFields {
    id: TaskId,
    members: Vec<Node>,
}

#[derive(serde::Deserialize)]
struct LinkedFields {
    node: Box<Node>,
    #[serde(default)]
    links: Vec<Node>,
    #[serde(default)]
    errbacks: Vec<Node>,
}

impl TaggedEnum for Node {
    type Kind = NodeKind;
    const WHAT: &'static str = "canvas node";
    fn read<'de, D: Deserializer<'de>>(kind: NodeKind, d: D) -> Result<Node, D::Error> {
        Ok(match kind {
            NodeKind::Task => {
                let TaskFields { env, receives, countdown_ms } = TaskFields::deserialize(d)?;
                Node::Task { env, receives, countdown_ms }
            }
            NodeKind::Chain => Node::Chain { steps: ChainFields::deserialize(d)?.steps },
            NodeKind::Group => {
                let GroupFields { id, members } = GroupFields::deserialize(d)?;
                Node::Group { id, members }
            }
            NodeKind::Linked => {
                let LinkedFields { node, links, errbacks } = LinkedFields::deserialize(d)?;
                Node::Linked { node, links, errbacks }
            }
        })
    }
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "snake_case")]
enum ContinuationKind {
    Done,
    Then,
    Member,
    Links,
}

#[derive(serde::Deserialize)]
struct ThenFields {
    next: Box<Node>,
    then: Box<Continuation>,
}

#[derive(serde::Deserialize)]
struct MemberFields {
    group: TaskId,
    index: usize,
    then: Deferred,
}

impl<'de> Deserialize<'de> for Deferred {
    /// Keeps the text; [`Deferred::get`] parses it when the member carries its group on.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Box::<RawValue>::deserialize(d).map(Deferred::from_text)
    }
}

#[derive(serde::Deserialize)]
struct LinksFields {
    #[serde(default)]
    links: Vec<Node>,
    #[serde(default)]
    errbacks: Vec<Node>,
    then: Box<Continuation>,
}

impl TaggedEnum for Continuation {
    type Kind = ContinuationKind;
    const WHAT: &'static str = "canvas continuation";
    fn read<'de, D: Deserializer<'de>>(kind: ContinuationKind, d: D) -> Result<Continuation, D::Error> {
        Ok(match kind {
            ContinuationKind::Done => {
                IgnoredAny::deserialize(d)?;
                Continuation::Done
            }
            ContinuationKind::Then => {
                let ThenFields { next, then } = ThenFields::deserialize(d)?;
                Continuation::Then { next, then }
            }
            ContinuationKind::Member => {
                let MemberFields { group, index, then } = MemberFields::deserialize(d)?;
                Continuation::Member { group, index, then }
            }
            ContinuationKind::Links => {
                let LinksFields { links, errbacks, then } = LinksFields::deserialize(d)?;
                Continuation::Links { links, errbacks, then }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn envelope(task: &str) -> Envelope {
        serde_json::from_value(json!({
            "v": 1,
            "id": TaskId::new(),
            "task": task,
            "args": {},
            "queue": "q",
            "priority": 0,
            "attempt": 0,
            "max_retries": 0,
            "created_at": "2026-01-01T00:00:00Z"
        }))
        .unwrap()
    }

    fn every_shape() -> Continuation {
        let task = |name: &str, receives: Option<&str>| Node::Task {
            env: Box::new(envelope(name)),
            receives: receives.map(str::to_owned),
            countdown_ms: Some(5),
        };
        let group = Node::Group { id: TaskId::new(), members: vec![task("a", None), task("b", Some("x"))] };
        let linked = Node::Linked {
            node: Box::new(Node::Chain { steps: vec![task("c", None), group] }),
            links: vec![task("ok", None)],
            errbacks: vec![task("err", None)],
        };
        Continuation::Member {
            group: TaskId::new(),
            index: 3,
            then: Deferred::new(Continuation::Then {
                next: Box::new(linked),
                then: Box::new(Continuation::Links {
                    links: vec![task("l", None)],
                    errbacks: Vec::new(),
                    then: Box::new(Continuation::Done),
                }),
            }),
        }
    }

    #[test]
    fn every_variant_round_trips() {
        let c = every_shape();
        let text = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Continuation>(&text).unwrap(), c);
        assert_eq!(serde_json::from_value::<Continuation>(serde_json::to_value(&c).unwrap()).unwrap(), c);
    }

    #[test]
    fn a_tag_written_last_still_reads() {
        let id = TaskId::new();
        let text = format!(r#"{{"group":"{id}","index":2,"then":{{"k":"done"}},"k":"member"}}"#);
        let c: Continuation = serde_json::from_str(&text).unwrap();
        assert_eq!(c, Continuation::Member { group: id, index: 2, then: Deferred::new(Continuation::Done) });
        let n: Node = serde_json::from_str(r#"{"steps":[],"k":"chain"}"#).unwrap();
        assert_eq!(n, Node::Chain { steps: Vec::new() });
    }

    #[test]
    fn bad_objects_are_clear_errors() {
        let missing = serde_json::from_str::<Continuation>(r#"{"index":1}"#).unwrap_err();
        assert!(missing.to_string().contains("missing field `k`"), "{missing}");
        let unknown = serde_json::from_str::<Continuation>(r#"{"k":"sideways"}"#).unwrap_err();
        assert!(unknown.to_string().contains("sideways"), "{unknown}");
        let late = serde_json::from_str::<Node>(r#"{"steps":[],"k":"spiral"}"#).unwrap_err();
        assert!(late.to_string().contains("canvas node"), "{late}");
        let fields = serde_json::from_str::<Continuation>(r#"{"k":"member","index":1}"#).unwrap_err();
        assert!(fields.to_string().contains("group"), "{fields}");
        assert!(serde_json::from_str::<Node>("[1]").is_err());
        assert!(serde_json::from_str::<Continuation>("{}").is_err());
    }

    #[test]
    fn what_follows_a_group_is_read_only_when_asked_for() {
        let id = TaskId::new();
        // A member whose group's continuation does not read: the member itself still reads
        // (only the member that carries the group on needs it), and the error shows there.
        let text = format!(r#"{{"k":"member","group":"{id}","index":0,"then":{{"k":"sideways"}}}}"#);
        let c: Continuation = serde_json::from_str(&text).unwrap();
        let Continuation::Member { then, .. } = &c else { panic!("{c:?}") };
        assert!(then.get().unwrap_err().to_string().contains("sideways"));
        // Passed through, the text is written back as it came.
        assert_eq!(serde_json::to_string(&c).unwrap(), text);

        // Built here, one text serves every clone.
        let shared = Deferred::new(every_shape());
        let a = Continuation::Member { group: id, index: 0, then: shared.clone() };
        let b = Continuation::Member { group: id, index: 1, then: shared };
        let (ta, tb) = (serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap());
        assert_eq!(ta.split_once(r#""then":"#).unwrap().1, tb.split_once(r#""then":"#).unwrap().1);
        assert_eq!(serde_json::from_str::<Continuation>(&tb).unwrap(), b);
    }

    #[test]
    fn unknown_fields_are_ignored_as_before() {
        let c: Continuation = serde_json::from_str(r#"{"k":"done","extra":[1,{"k":"x"}]}"#).unwrap();
        assert_eq!(c, Continuation::Done);
    }
}
