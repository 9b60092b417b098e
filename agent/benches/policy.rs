//! Policy evaluation cost per decision with 1,000 rules (issue 4 target:
//! ≤ 2 µs median). `cargo xtask bench policy` runs it.

use std::path::Path;

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use loopgate::policy::{model::compile, Request};

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
        protocol: "postgres",
        kind: "connect",
        jwt_subject: None,
        method: None,
        path: None,
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

criterion_group!(benches, bench);
criterion_main!(benches);
