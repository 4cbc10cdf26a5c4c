//! Group and chord bookkeeping of the Redis result backend.
//!
//! One hash per group (`{ns}:g:{id}`, TTL = result TTL from `group_init`): `total` (members),
//! `f` (failed members), `claimed` (set once by `chord_claim`) and `m{index}`, the first
//! outcome recorded for member `index`. Succeeded members are not counted in a field of their
//! own: they are the member fields that are not failures, `HLEN` minus the fixed fields minus
//! `f`. That lets the common record, a success, go out as a plain `HSETNX` in a `MULTI`
//! (the first outcome per index wins; a second one adds no field, so nothing is counted
//! twice) instead of a script call, which Redis runs at several times the cost. A failure has
//! to count itself in `f` only if its `HSETNX` won, which takes a script.
//!
//! The plain path needs the group's `total` to refuse an index out of range before writing
//! it: totals never change, so they are kept from the scripts' answers (a group's first
//! records go through the script).

use std::collections::HashMap;

use parking_lot::Mutex;
use redis::Value;
use stem::TaskId;
use stem::backend::{GroupCounts, GroupState, MemberOutcome, MemberRecord, TaskState};
use stem::{Error, Result};

use super::backend::Inner;
use super::scripts;

/// Most group members recorded by one `group_record_many` call.
const RECORD_CHUNK: usize = 1_000;

/// Most member fields one `HMGET` of `group_get` names.
const READ_CHUNK: usize = 10_000;

/// Group totals remembered at most; the table is emptied when it would grow beyond.
const TOTALS_KEPT: usize = 4_096;

/// The fields of a group hash that are not members, in the order `HMGET` asks for them.
/// (`s`, a succeeded counter, is only counted if a group made by an older build has it.)
const FIXED: [&str; 4] = ["total", "s", "f", "claimed"];

fn err(e: impl Into<stem::error::BoxError>) -> Error {
    Error::backend(e)
}

/// Totals of groups seen in scripts' answers, for the plain path's range check.
#[derive(Debug, Default)]
pub(super) struct Totals(Mutex<HashMap<TaskId, usize>>);

impl Totals {
    fn get(&self, group: TaskId) -> Option<usize> {
        self.0.lock().get(&group).copied()
    }

    fn keep(&self, group: TaskId, total: usize) {
        let mut totals = self.0.lock();
        if totals.len() >= TOTALS_KEPT {
            totals.clear();
        }
        totals.insert(group, total);
    }

    fn forget(&self, group: TaskId) {
        self.0.lock().remove(&group);
    }
}

/// A group's hash field for member `index`: `m{index}`.
pub(super) fn member_field(index: usize) -> String {
    let mut buf = itoa::Buffer::new();
    let digits = buf.format(index);
    let mut field = String::with_capacity(1 + digits.len());
    field.push('m');
    field.push_str(digits);
    field
}

/// Counts from a group script's answer `{total, succeeded, failed}`, or its error: `{-1}` an
/// unknown group, `{-2}` an index out of range.
pub(super) fn group_counts(group: TaskId, index: usize, counts: &[i64]) -> Result<GroupCounts> {
    match counts {
        [-1, ..] => Err(unknown_group(group)),
        [-2, ..] => Err(no_member(group, index)),
        [total, s, f] => Ok(GroupCounts {
            total: usize::try_from(*total).unwrap_or(0),
            succeeded: usize::try_from(*s).unwrap_or(0),
            failed: usize::try_from(*f).unwrap_or(0),
        }),
        other => Err(err(format!("unexpected group counters {other:?}"))),
    }
}

fn unknown_group(group: TaskId) -> Error {
    err(format!("group {group} does not exist or has expired"))
}

fn no_member(group: TaskId, index: usize) -> Error {
    err(format!("group {group} has no member {index}"))
}

/// Each record's counts, read right after it was applied, from where the group stood before
/// the call (`total`, `s`, `f`) and which records were applied (`'1'`), already recorded
/// (`'0'`) or out of range (`'2'`).
fn counts_after_each<'r>(
    group: TaskId,
    records: impl Iterator<Item = &'r MemberRecord>,
    (total, mut s, mut f): (i64, i64, i64),
    flags: &[u8],
) -> Vec<Result<GroupCounts>> {
    records
        .zip(flags)
        .map(|(r, flag)| {
            match flag {
                b'2' => return Err(no_member(group, r.index)),
                b'1' if r.outcome.state == TaskState::Succeeded => s += 1,
                b'1' => f += 1,
                _ => {}
            }
            group_counts(group, r.index, &[total, s, f])
        })
        .collect()
}

/// One record through the script (`group_record.lua`).
pub(super) async fn record(
    inner: &Inner,
    group: TaskId,
    index: usize,
    outcome: &MemberOutcome,
) -> Result<GroupCounts> {
    let mut e = inner.eval(&scripts::GROUP_RECORD);
    e.arg(group.to_string())
        .arg(index)
        .arg(u8::from(outcome.state == TaskState::Succeeded))
        .arg(serde_json::to_vec(outcome)?);
    let counts: Vec<i64> = e.run(&mut inner.cmd()).await.map_err(err)?;
    if let Some(total) = counts.first().and_then(|t| usize::try_from(*t).ok()) {
        inner.totals.keep(group, total);
    }
    group_counts(group, index, &counts)
}

/// Records of many members, of one group or several: per group, the plain path when its
/// total is known and every record is a success, else the script; one result per record, in
/// the order given.
pub(super) async fn record_many(
    inner: &Inner,
    records: Vec<MemberRecord>,
) -> Result<Vec<Result<GroupCounts>>> {
    let mut out: Vec<Option<Result<GroupCounts>>> = (0..records.len()).map(|_| None).collect();
    for (offset, chunk) in (0..).step_by(RECORD_CHUNK).zip(records.chunks(RECORD_CHUNK)) {
        let groups = super::grouped(chunk.iter().enumerate(), |(_, r)| Some(r.group));
        let (plain, scripted): (Vec<_>, Vec<_>) = groups.into_iter().partition(|(group, members)| {
            inner.totals.get(*group).is_some()
                && members.iter().all(|(_, r)| r.outcome.state == TaskState::Succeeded)
        });
        let (plain, scripted) =
            futures_util::future::try_join(record_plain(inner, &plain), record_scripted(inner, &scripted))
                .await?;
        for (at, result) in plain.into_iter().chain(scripted) {
            if let Some(slot) = out.get_mut(offset + at) {
                *slot = Some(result);
            }
        }
    }
    Ok(records
        .iter()
        .zip(out)
        .map(|(r, c)| {
            c.unwrap_or_else(|| {
                Err(err(format!(
                    "group_record_many gave no answer for member {} of group {}",
                    r.index, r.group
                )))
            })
        })
        .collect())
}

/// Records of one group each, with their index in the chunk.
type ByGroup<'r> = [(TaskId, Vec<(usize, &'r MemberRecord)>)];

/// Successes of groups whose total is known, in one `MULTI`: per group an `HSETNX` per record
/// in range, a `PEXPIRE … NX` (a group that expired meanwhile must not come back as a hash
/// without expiry), then `HLEN` and the fixed fields, from which the counts follow.
async fn record_plain(inner: &Inner, groups: &ByGroup<'_>) -> Result<Vec<(usize, Result<GroupCounts>)>> {
    let mut out = Vec::new();
    if groups.is_empty() {
        return Ok(out);
    }
    let ttl = u64::try_from(inner.ttl.as_millis()).unwrap_or(u64::MAX).max(1);
    let mut pipe = redis::pipe();
    pipe.atomic();
    // Per group: its total and which of its records were sent.
    let mut sent: Vec<(usize, Vec<bool>)> = Vec::with_capacity(groups.len());
    for (group, members) in groups {
        let total = inner.totals.get(*group).unwrap_or(0);
        let key = inner.keys.group(*group);
        let in_range: Vec<bool> = members.iter().map(|(_, r)| r.index < total).collect();
        for ((_, r), _) in members.iter().zip(&in_range).filter(|(_, ok)| **ok) {
            pipe.cmd("HSETNX").arg(&key).arg(member_field(r.index)).arg(serde_json::to_vec(&r.outcome)?);
        }
        pipe.cmd("PEXPIRE").arg(&key).arg(ttl).arg("NX");
        pipe.cmd("HLEN").arg(&key);
        pipe.cmd("HMGET").arg(&key).arg(&FIXED[..]);
        sent.push((total, in_range));
    }
    let answers: Vec<Value> = pipe.query_async(&mut inner.cmd()).await.map_err(err)?;
    let mut answers = answers.into_iter();
    for ((group, members), (total, in_range)) in groups.iter().zip(sent) {
        let malformed = || err(format!("unexpected answer recording members of group {group}"));
        let applied: Vec<bool> = in_range
            .iter()
            .filter(|ok| **ok)
            .map(|_| matches!(answers.next(), Some(Value::Int(1))))
            .collect();
        let (Some(_expire), Some(Value::Int(len)), Some(fixed)) =
            (answers.next(), answers.next(), answers.next())
        else {
            return Err(malformed());
        };
        let fixed: Vec<Option<i64>> = redis::from_redis_value(fixed).map_err(|_| malformed())?;
        if fixed.first().copied().flatten().is_none() {
            // Gone (expired) since its total was learnt: as the script would answer.
            inner.totals.forget(*group);
            out.extend(members.iter().map(|(at, _)| (*at, Err(unknown_group(*group)))));
            continue;
        }
        let failed = fixed.get(2).copied().flatten().unwrap_or(0);
        let present = i64::try_from(fixed.iter().flatten().count()).unwrap_or(0);
        let newly = i64::try_from(applied.iter().filter(|a| **a).count()).unwrap_or(0);
        let succeeded_before = len - present - failed - newly;
        // Same flags as the script's: '2' out of range (not sent), '1' applied, '0' recorded.
        let mut applied = applied.into_iter();
        let flags: Vec<u8> = in_range
            .iter()
            .map(|ok| match (ok, *ok && applied.next() == Some(true)) {
                (false, _) => b'2',
                (true, true) => b'1',
                (true, false) => b'0',
            })
            .collect();
        let total = i64::try_from(total).unwrap_or(i64::MAX);
        let counts = counts_after_each(
            *group,
            members.iter().map(|(_, r)| *r),
            (total, succeeded_before, failed),
            &flags,
        );
        out.extend(members.iter().map(|(at, _)| *at).zip(counts));
    }
    Ok(out)
}

/// Records through one `group_record_many` script call, which answers per group `total` (-1:
/// unknown group), succeeded and failed before the call, and one flag per record.
async fn record_scripted(inner: &Inner, groups: &ByGroup<'_>) -> Result<Vec<(usize, Result<GroupCounts>)>> {
    let mut out = Vec::new();
    if groups.is_empty() {
        return Ok(out);
    }
    let mut e = inner.eval(&scripts::GROUP_RECORD_MANY);
    let mut id_buf = [0u8; 36];
    for (group, members) in groups {
        e.arg(&*group.0.as_hyphenated().encode_lower(&mut id_buf)).arg(members.len());
        for (_, r) in members {
            e.arg(r.index)
                .arg(member_field(r.index))
                .arg(u8::from(r.outcome.state == TaskState::Succeeded))
                .arg(serde_json::to_vec(&r.outcome)?);
        }
    }
    let answer: Vec<Value> = e.run(&mut inner.cmd()).await.map_err(err)?;
    if answer.len() != groups.len() * 4 {
        return Err(err(format!("unexpected answer from group_record_many: {answer:?}")));
    }
    for ((group, members), reply) in groups.iter().zip(answer.chunks(4)) {
        let [Value::Int(total), Value::Int(s), Value::Int(f), Value::BulkString(flags)] = reply else {
            return Err(err(format!("unexpected answer for group {group}: {reply:?}")));
        };
        if flags.len() != members.len() {
            return Err(err(format!("unexpected answer for group {group}: {reply:?}")));
        }
        let Ok(known) = usize::try_from(*total) else {
            out.extend(members.iter().map(|(at, _)| (*at, Err(unknown_group(*group)))));
            continue;
        };
        inner.totals.keep(*group, known);
        let counts = counts_after_each(*group, members.iter().map(|(_, r)| *r), (*total, *s, *f), flags);
        out.extend(members.iter().map(|(at, _)| *at).zip(counts));
    }
    Ok(out)
}

/// A group: `total` first (fixed when the group is made), then one consistent read of the
/// fixed fields and every member's field by name, in member order (half the answer of an
/// `HGETALL`, which has the field names too, and no map to build: for a chord of 10,000 that
/// was most of the time between its last member and its callback).
pub(super) async fn get(inner: &Inner, group: TaskId) -> Result<Option<GroupState>> {
    let key = inner.keys.group(group);
    let total: Option<usize> =
        redis::cmd("HGET").arg(&key).arg("total").query_async(&mut inner.cmd()).await.map_err(err)?;
    let Some(total) = total else { return Ok(None) };
    let mut pipe = redis::pipe();
    pipe.atomic().cmd("HMGET").arg(&key).arg(&FIXED[..]);
    for start in (0..total).step_by(READ_CHUNK) {
        let members = pipe.cmd("HMGET").arg(&key);
        for index in start..total.min(start + READ_CHUNK) {
            members.arg(member_field(index));
        }
    }
    let answers: Vec<Vec<Option<Vec<u8>>>> = pipe.query_async(&mut inner.cmd()).await.map_err(err)?;
    let mut answers = answers.into_iter();
    let fixed = answers.next().unwrap_or_default();
    let field = |name: &str| -> Option<&[u8]> {
        let at = FIXED.iter().position(|f| *f == name)?;
        fixed.get(at)?.as_deref()
    };
    let num = |name: &str| -> Option<usize> { std::str::from_utf8(field(name)?).ok()?.parse().ok() };
    let Some(total) = num("total") else { return Ok(None) };
    let members = answers
        .flatten()
        .map(|m| m.map(|json| serde_json::from_slice(&json)).transpose())
        .collect::<std::result::Result<Vec<Option<MemberOutcome>>, _>>()?;
    let failed = num("f").unwrap_or(0);
    let recorded = members.iter().flatten().count();
    Ok(Some(GroupState {
        id: group,
        members,
        counts: GroupCounts { total, succeeded: recorded.saturating_sub(failed), failed },
        claimed: field("claimed").is_some(),
    }))
}
