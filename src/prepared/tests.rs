use super::*;

#[test]
fn recognises_statement_commands() {
    assert_eq!(sql_command(b"DEALLOCATE ALL"), SqlCommand::DeallocateAll);
    assert_eq!(
        sql_command(b"  deallocate prepare ALL ; "),
        SqlCommand::DeallocateAll
    );
    assert_eq!(
        sql_command(b"DEALLOCATE Foo"),
        SqlCommand::Deallocate(b"foo".to_vec())
    );
    assert_eq!(
        sql_command(b"DEALLOCATE \"Foo\"\"x\";"),
        SqlCommand::Deallocate(b"Foo\"x".to_vec())
    );
    assert_eq!(sql_command(b"discard all"), SqlCommand::DiscardAll);
    assert_eq!(sql_command(b"DISCARD TEMP"), SqlCommand::Other);
    assert_eq!(sql_command(b"DEALLOCATE a; SELECT 1"), SqlCommand::Other);
    assert_eq!(sql_command(b"/* x */ DEALLOCATE a"), SqlCommand::Other);
    assert_eq!(sql_command(b"SELECT 1"), SqlCommand::Other);
    assert_eq!(sql_command(b""), SqlCommand::Other);
}

#[test]
fn cache_interns_per_tenant_and_forgets_unused() {
    let cache = Arc::new(StatementCache::default());
    let a = cache.intern(1, b"SELECT 1\0\0\0");
    let b = cache.intern(1, b"SELECT 1\0\0\0");
    let c = cache.intern(2, b"SELECT 1\0\0\0");
    assert_eq!(a.id, b.id);
    assert_ne!(a.id, c.id);
    assert_eq!(cache.len(), 2);
    assert!(a.name().starts_with(PREFIX) && a.name().ends_with(&[0]));
    assert_eq!(&a.parse_message()[a.name_end..], b"SELECT 1\0\0\0");
    drop((a, b));
    assert_eq!(cache.len(), 1);
    drop(c);
    assert!(cache.is_empty());
}

#[test]
fn server_statements_evict_least_recently_used() {
    let cache = Arc::new(StatementCache::default());
    let s: Vec<_> = (0..3)
        .map(|i| cache.intern(1, format!("SELECT {i}\0\0\0").as_bytes()))
        .collect();
    let mut set = ServerStatements::default();
    assert!(set.insert(s[0].clone(), 2).is_none());
    assert!(set.insert(s[1].clone(), 2).is_none());
    assert!(set.touch(s[0].id));
    let evicted = set.insert(s[2].clone(), 2).unwrap();
    assert_eq!(evicted.id, s[1].id);
    assert_eq!(set.len(), 2);
}

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

/// Runs the rewriter over `input`, returning what the server would get.
fn rewrite_all(t: &mut Tracker<'_>, input: &[u8]) -> Vec<u8> {
    let mut out = Out::default();
    let mut pos = 0;
    t.rewrite(input, &mut pos, input.len(), &mut out).unwrap();
    assert_eq!(pos, input.len());
    out.flatten(input)
}

/// Every whole message, however malformed its body, is either refused (08P01) or
/// handed on (sent, dropped or answered): never waited on, which would pin the
/// server connection while the relay reads the client's bytes without end.
#[test]
fn malformed_whole_messages_are_never_waited_on() {
    let bodies: [&[u8]; 9] = [
        b"",
        b"\0",
        b"x",
        b"S",
        b"P",
        b"Sname",
        b"name",
        b"\0\0",
        b"name\0\xff\xff",
    ];
    for tag in [
        b'P', b'B', b'D', b'C', b'Q', b'E', b'H', b'F', b'd', b'c', b'f',
    ] {
        for body in bodies {
            let cache = Arc::new(StatementCache::default());
            let mut client = ClientStatements::default();
            let mut server = ServerStatements::default();
            let mut t = Tracker::new(&mut client, &mut server, &cache, 0, 10);
            let mut input = msg(tag, body);
            input.extend(msg(b'S', b""));
            let mut out = Out::default();
            let mut pos = 0;
            if t.rewrite(&input, &mut pos, input.len(), &mut out).is_ok() {
                assert_eq!(
                    pos,
                    input.len(),
                    "{} {:?} waited on",
                    tag as char,
                    String::from_utf8_lossy(body)
                );
            }
        }
    }
}

#[test]
fn renames_and_prepares_once_per_connection() {
    let cache = Arc::new(StatementCache::default());
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut t = Tracker::new(&mut client, &mut server, &cache, 0, 10);
    let mut input = msg(b'P', b"s1\0SELECT $1\0\0\0");
    input.extend(msg(b'B', b"\0s1\0\0\0\0\x01\0\0\0\x011\0\0"));
    input.extend(msg(b'S', b""));
    let sent = rewrite_all(&mut t, &input);
    let parse = cache.intern(0, b"SELECT $1\0\0\0");
    let name = parse.name().to_vec();
    let mut want = Vec::new();
    let mut close = vec![b'S'];
    close.extend(&name);
    want.extend(msg(b'C', &close));
    want.extend(parse.parse_message());
    let mut bind = vec![0];
    bind.extend(&name);
    bind.extend(b"\0\0\0\x01\0\0\0\x011\0\0");
    want.extend(msg(b'B', &bind));
    want.extend(msg(b'S', b""));
    assert_eq!(sent, want);
    // Replies: the Close's CloseComplete is dropped, the rest passes.
    assert!(t.drops(b'3'));
    assert!(!t.reply(b'3', None));
    assert!(!t.drops(b'1'));
    t.reply(b'1', None);
    t.reply(b'2', None);
    t.reply(b'Z', None);
    assert_eq!(t.expecting(), 0);
    assert!(!t.desync);

    // Same name again: 42P05 from the proxy, the batch skipped to Sync.
    let mut input = msg(b'P', b"s1\0SELECT $1\0\0\0");
    input.extend(msg(b'E', b"\0\0\0\0\0"));
    input.extend(msg(b'S', b""));
    let sent = rewrite_all(&mut t, &input);
    assert_eq!(sent, msg(b'S', b""));
    let mut back = Out::default();
    t.answer(b'I', &mut back);
    let answered = back.flatten(&[]);
    assert_eq!(answered[0], b'E');
    assert!(String::from_utf8_lossy(&answered).contains("42P05"));
    t.reply(b'Z', None);
    assert_eq!(t.expecting(), 0);

    // Another client of the tenant: its Parse is answered by the proxy.
    let mut other = ClientStatements::default();
    let mut t = Tracker::new(&mut other, &mut server, &cache, 0, 10);
    let mut input = msg(b'P', b"x\0SELECT $1\0\0\0");
    input.extend(msg(b'S', b""));
    let sent = rewrite_all(&mut t, &input);
    assert_eq!(sent, msg(b'S', b""));
    let mut back = Out::default();
    t.answer(b'I', &mut back);
    assert_eq!(back.flatten(&[]), b"1\0\0\0\x04");
}

#[test]
fn known_statements_are_prepared_without_a_server() {
    let cache = Arc::new(StatementCache::default());
    let held = cache.intern(3, b"SELECT 1\0\0\0");
    let mut client = ClientStatements::default();
    let mut batch = msg(b'P', b"a\0SELECT 1\0\0\0");
    batch.extend(msg(b'C', b"Sold\0"));
    batch.extend(msg(b'S', b""));
    let reply = answer_alone(&mut client, &cache, 3, &batch).unwrap();
    assert_eq!(&reply[..], b"1\0\0\0\x043\0\0\0\x04Z\0\0\0\x05I");
    assert_eq!(client.get(b"a").unwrap().id, held.id);
    // Unknown text, another tenant, a duplicate name, no Sync: the server is needed.
    for (tenant, batch) in [
        (
            3,
            [msg(b'P', b"b\0SELECT 2\0\0\0"), msg(b'S', b"")].concat(),
        ),
        (
            4,
            [msg(b'P', b"b\0SELECT 1\0\0\0"), msg(b'S', b"")].concat(),
        ),
        (
            3,
            [msg(b'P', b"a\0SELECT 1\0\0\0"), msg(b'S', b"")].concat(),
        ),
        (3, msg(b'P', b"b\0SELECT 1\0\0\0")),
    ] {
        assert!(answer_alone(&mut client, &cache, tenant, &batch).is_none());
    }
    assert_eq!(client.len(), 1);
}

#[test]
fn an_answer_deferred_by_a_passing_notice_goes_out_at_its_end() {
    let cache = Arc::new(StatementCache::default());
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let stmt = cache.intern(0, b"SELECT 1\0\0\0");
    server.insert(stmt.clone(), 10);
    let mut t = Tracker::new(&mut client, &mut server, &cache, 0, 10);
    // The Parse is answered by the proxy; suppose a NoticeResponse was passing then.
    let mut input = msg(b'P', b"a\0SELECT 1\0\0\0");
    input.extend(msg(b'S', b""));
    assert_eq!(rewrite_all(&mut t, &input), msg(b'S', b""));
    // The notice ends: the ParseComplete is due, before the Sync's ReadyForQuery.
    assert!(t.reply(b'N', None));
    let mut back = Out::default();
    t.answer(b'I', &mut back);
    assert_eq!(back.flatten(&[]), b"1\0\0\0\x04");
    assert!(!t.reply(b'Z', None));
    assert_eq!(t.expecting(), 0);
    assert!(!t.desync);
}

#[test]
fn failed_injected_parse_undoes_and_skips() {
    let cache = Arc::new(StatementCache::default());
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let stmt = cache.intern(0, b"SELECT nope\0\0\0");
    client.insert((*b"s").into(), stmt.clone());
    let mut t = Tracker::new(&mut client, &mut server, &cache, 0, 10);
    let mut input = msg(b'B', b"\0s\0\0\0\0\0\0\0");
    input.extend(msg(b'E', b"\0\0\0\0\0"));
    input.extend(msg(b'S', b""));
    rewrite_all(&mut t, &input);
    assert_eq!(t.expecting(), 5); // Close, Parse, Bind, Execute, Sync
    t.reply(b'3', None);
    assert!(!t.drops(b'E'));
    t.reply(b'E', Some("42P01"));
    assert_eq!(t.expecting(), 1);
    t.reply(b'Z', None);
    assert_eq!(t.expecting(), 0);
    assert!(!t.server.touch(stmt.id));
    assert!(t.client.get(b"s").is_some());
}

#[test]
fn a_parse_without_a_body_is_a_violation_not_a_wait() {
    // Found by the tracker fuzz target: `P` with length 4 was waited on for ever.
    let cache = Arc::new(StatementCache::default());
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut t = Tracker::new(&mut client, &mut server, &cache, 0, 10);
    let mut input = msg(b'P', b"");
    input.extend(msg(b'S', b""));
    let (mut pos, mut out) = (0, Out::default());
    let e = t
        .rewrite(&input, &mut pos, input.len(), &mut out)
        .unwrap_err();
    assert_eq!(e.code, "08P01");
    // A Parse whose body has not come yet: wait for it.
    let input = msg(b'P', b"a\0SELECT 1\0\0\0");
    let (mut pos, mut out) = (0, Out::default());
    t.rewrite(&input, &mut pos, 5, &mut out).unwrap();
    assert_eq!(pos, 0);
}

#[test]
fn describe_or_close_without_a_nul_is_a_violation() {
    // Found by the tracker fuzz target: the proxy answered CloseComplete to a Close whose
    // name had no terminator, where PostgreSQL ends the connection.
    let cache = Arc::new(StatementCache::default());
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut t = Tracker::new(&mut client, &mut server, &cache, 0, 10);
    for m in [msg(b'C', b"Sname"), msg(b'D', b"Sname"), msg(b'C', b"P")] {
        let (mut pos, mut out) = (0, Out::default());
        let e = t.rewrite(&m, &mut pos, m.len(), &mut out).unwrap_err();
        assert_eq!(e.code, "08P01");
    }
}

#[test]
fn messages_after_an_error_already_answered_are_skipped_as_the_server_skips_them() {
    // PostgreSQL flushes an ErrorResponse at once and then ignores everything up to the
    // next Sync. Messages the client sends after the error came back must be skipped
    // by the proxy too: not answered by it, not expected from the server.
    let cache = Arc::new(StatementCache::default());
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    server.insert(cache.intern(0, b"SELECT 1\0\0\0"), 10);
    let mut t = Tracker::new(&mut client, &mut server, &cache, 0, 10);
    rewrite_all(&mut t, &msg(b'P', b"a\0SELECT bad\0\0\0"));
    assert!(!t.reply(b'3', None));
    assert!(!t.reply(b'E', Some("42601")));
    assert_eq!(t.expecting(), 0);
    // Then: a Parse the proxy would answer itself, one it would send, and Sync.
    let mut input = msg(b'P', b"c\0SELECT 1\0\0\0");
    input.extend(msg(b'P', b"b\0SELECT 2\0\0\0"));
    input.extend(msg(b'S', b""));
    assert_eq!(rewrite_all(&mut t, &input), msg(b'S', b""));
    let mut back = Out::default();
    assert_eq!(t.answer(b'I', &mut back), Answered::default());
    assert!(back.is_empty(), "no ParseComplete after the error");
    assert!(!t.reply(b'Z', None));
    assert!(!t.desync);
    assert_eq!(t.expecting(), 0);
    assert!(t.client.is_empty());
}

#[test]
fn skipped_messages_are_undone_last_first() {
    // Found by the tracker fuzz target: Parse "x" then Close "x" in a batch that an
    // earlier error skipped left "x" with the client (the Close's undo came last).
    let cache = Arc::new(StatementCache::default());
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    let mut t = Tracker::new(&mut client, &mut server, &cache, 0, 10);
    let mut input = msg(b'D', b"Snope\0");
    input.extend(msg(b'P', b"x\0SELECT 1\0\0\0"));
    input.extend(msg(b'C', b"Sx\0"));
    input.extend(msg(b'S', b""));
    rewrite_all(&mut t, &input);
    assert!(t.client.is_empty());
    assert!(!t.reply(b'E', Some("26000")));
    assert!(t.client.is_empty(), "neither the Parse nor the Close ran");
    assert!(!t.reply(b'Z', None));
    assert_eq!(t.expecting(), 0);
    assert!(!t.desync);
    // A DEALLOCATE then a Parse of the same name, skipped: the old statement is back.
    let old = cache.intern(0, b"SELECT 2\0\0\0");
    t.client.insert((*b"y").into(), old.clone());
    let mut input = msg(b'D', b"Snope\0");
    input.extend(msg(b'C', b"Sy\0"));
    input.extend(msg(b'P', b"y\0SELECT 3\0\0\0"));
    input.extend(msg(b'S', b""));
    rewrite_all(&mut t, &input);
    assert!(!t.reply(b'E', Some("26000")));
    assert_eq!(t.client.get(b"y").map(|s| s.id), Some(old.id));
}

#[test]
fn deallocate_is_answered_and_undone_in_failed_transaction() {
    let cache = Arc::new(StatementCache::default());
    let mut client = ClientStatements::default();
    let mut server = ServerStatements::default();
    client.insert((*b"s").into(), cache.intern(0, b"SELECT 1\0\0\0"));
    let mut t = Tracker::new(&mut client, &mut server, &cache, 0, 10);
    let q = msg(b'Q', b"DEALLOCATE s\0");
    assert!(rewrite_all(&mut t, &q).is_empty());
    assert!(t.client.is_empty());
    let mut back = Out::default();
    let a = t.answer(b'E', &mut back);
    assert_eq!(a, Answered { ready: 1, idle: 0 });
    assert!(String::from_utf8_lossy(&back.flatten(&[])).contains("25P02"));
    assert_eq!(t.client.len(), 1);
}
