//! Policy evaluation cost per decision with 1,000 rules (issue 4 target:
//! ≤ 2 µs median), and with CEL `when` conditions on HTTP requests.
//! `cargo xtask bench policy` runs it.

use std::path::Path;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use loopgate::{
    kinds::Protocol,
    policy::{model::compile, HttpOp, Operation, Request},
};

fn policy_text(rules: usize) -> String {
    let mut t = String::from("[defaults]\naction = \"allow\"\n");
    for w in 0..20 {
        t.push_str(&format!(
            "[[workloads]]\nname = \"w{w}\"\nworkload = \"team{w}-*\"\n\n"
        ));
    }
    t.push_str("[[workloads]]\nname = \"root\"\nuid = 0\n\n");
    for i in 0..rules {
        let action = match i % 10 {
            0 => "deny",
            1 => "approve",
            _ => "allow",
        };
        t.push_str(&format!(
            "[[rules]]\nid = \"r{i}\"\nworkloads = [\"w{}\"]\ntargets = [\"t{}\"]\nprotocols = [\"postgres\", \"tcp\"]\naction = \"{action}\"\n\n",
            i % 20,
            i % 100
        ));
    }
    t.push_str("[[rules]]\nid = \"no-root\"\nworkloads = [\"root\"]\ntargets = [\"*\"]\naction = \"deny\"\n");
    t
}

fn bench(c: &mut Criterion) {
    let text = policy_text(1000);
    let p = compile(&[(Path::new("bench.toml"), &text)], None).expect("valid policy");
    assert_eq!(p.rule_count(), 1001);
    let req = Request {
        workload: "team7-nightly",
        cgroup: "loopgate/team7-nightly/i-1",
        uid: 1000,
        exe: None,
        target: "t47",
        protocol: Protocol::Postgres,
        jwt: None,
        op: Operation::Connect,
    };
    // Identity matched once per connection, decisions per request.
    let matched = p.workload_matches(&req);
    c.bench_function("evaluate_1000_rules", |b| {
        b.iter(|| p.evaluate(black_box(&req), Some(&matched)))
    });
    c.bench_function("match_identity_and_evaluate_1000_rules", |b| {
        b.iter(|| p.evaluate(black_box(&req), None))
    });
    let miss = Request {
        target: "unknown-target",
        ..req.clone()
    };
    c.bench_function("evaluate_1000_rules_no_match", |b| {
        b.iter(|| p.evaluate(black_box(&miss), Some(&matched)))
    });
}

/// 1,000 HTTP request rules with `when` conditions (10 per target).
fn when_text(rules: usize) -> String {
    let mut t = String::from("[defaults]\naction = \"allow\"\n");
    for i in 0..rules {
        let action = match i % 10 {
            0 => "deny",
            1 => "approve",
            _ => "allow",
        };
        t.push_str(&format!(
            "[[rules]]\nid = \"r{i}\"\ntargets = [\"t{}\"]\nprotocols = [\"http\"]\nwhen = \"http.method == 'DELETE' && http.path.startsWith('/r{i}/') && workload != 'w{i}'\"\naction = \"{action}\"\n\n",
            i % 100
        ));
    }
    t
}

fn bench_when(c: &mut Criterion) {
    let text = when_text(1000);
    let p = compile(&[(Path::new("bench.toml"), &text)], None).expect("valid policy");
    let mut headers = hyper::HeaderMap::new();
    for (k, v) in [
        ("host", "api.internal"),
        ("accept", "application/json"),
        ("user-agent", "curl/8.5.0"),
    ] {
        headers.insert(k, v.parse().expect("header"));
    }
    let req = Request {
        workload: "team7-nightly",
        cgroup: "loopgate/team7-nightly/i-1",
        uid: 1000,
        exe: None,
        target: "t47",
        protocol: Protocol::Http,
        jwt: None,
        op: Operation::Http(HttpOp {
            method: "GET",
            path: "/orders/1",
            host: Some("api.internal"),
            headers: Some(&headers),
        }),
    };
    let matched = p.workload_matches(&req);
    // The 10 rules of the target are evaluated, each with its condition.
    c.bench_function("evaluate_1000_rules_with_when", |b| {
        b.iter(|| p.evaluate(black_box(&req), Some(&matched)))
    });
}

criterion_group!(benches, bench, bench_when);
criterion_main!(benches);
