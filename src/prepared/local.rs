//! Answers the proxy gives without a server connection (a batch that needs none).

use super::*;

/// Answers, without a server connection, a batch that needs none: Parses of statements
/// the tenant already has and Closes, then Sync (what libpq's `PQprepare` sends). The
/// client is between transactions, so it gets ReadyForQuery "idle". Returns `None` when
/// the batch needs a server (anything else, or anything unusual).
///
/// Beyond saving a round trip, this keeps a client that prepares synchronously while the
/// pool is busy (pgbench -M prepared, one thread for many clients) from waiting on a
/// connection held by a client that waits on it.
pub fn answer_alone(
    client: &mut ClientStatements,
    cache: &StatementCache,
    tenant: TenantId,
    batch: &[u8],
) -> Option<BytesMut> {
    enum Step<'b> {
        Parse(&'b [u8], Arc<Stmt>),
        Close(&'b [u8]),
    }
    let mut steps = Vec::new();
    let mut pos = 0;
    let mut synced = false;
    while pos < batch.len() {
        let (tag, Ok(len)) = header(&batch[pos..])? else {
            return None;
        };
        if synced || pos + len > batch.len() {
            return None;
        }
        let body = &batch[pos + HEADER_LEN..pos + len];
        let name_used = |steps: &[Step<'_>], name: &[u8]| {
            steps.iter().any(|s| match s {
                Step::Parse(n, _) | Step::Close(n) => *n == name,
            })
        };
        match tag {
            b'P' => {
                let (name, n) = cstr(body)?;
                if name.is_empty()
                    || name.len() > MAX_NAME
                    || client.get(name).is_some()
                    || name_used(&steps, name)
                {
                    return None;
                }
                let stmt = cache.get(tenant, &body[n..])?;
                steps.push(Step::Parse(name, stmt));
            }
            b'C' if body.first() == Some(&b'S') => {
                let (name, _) = cstr(&body[1..])?;
                if name.is_empty() || name_used(&steps, name) {
                    return None;
                }
                steps.push(Step::Close(name));
            }
            b'S' => synced = true,
            _ => return None,
        }
        pos += len;
    }
    if !synced {
        return None;
    }
    let mut cost = 0;
    for s in &steps {
        if let Step::Parse(name, stmt) = s {
            cost += name.len() + stmt.cost();
        }
    }
    if client.len() + steps.len() > MAX_CLIENT_STATEMENTS
        || client.bytes() + cost > MAX_CLIENT_STATEMENT_BYTES
    {
        return None;
    }
    let mut out = BytesMut::with_capacity(5 * steps.len() + 6);
    for s in steps {
        match s {
            Step::Parse(name, stmt) => {
                client.insert(name.into(), stmt);
                out.extend_from_slice(b"1\0\0\0\x04");
            }
            Step::Close(name) => {
                client.remove(name);
                out.extend_from_slice(b"3\0\0\0\x04");
            }
        }
    }
    put_ready_for_query(&mut out, b'I');
    Some(out)
}

/// Appends a Close of the statement `name` (with its NUL).
pub(super) fn put_close(out: &mut Out, name: &[u8]) {
    out.own_with(|b| {
        b.put_u8(b'C');
        b.put_u32((4 + 1 + name.len()) as u32);
        b.put_u8(b'S');
        b.extend_from_slice(name);
    });
}
