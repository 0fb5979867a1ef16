//! Shared by the PostgreSQL tests: the throw-away cluster of `bluegreen-testenv` (`initdb` in a
//! temp dir, a loopback port, `wal_level=logical`, stopped on drop) and a small application
//! schema with its consistency checks.
#![allow(dead_code, unreachable_pub)]

pub use bluegreen_testenv::pg::Cluster;
use tokio_postgres::Client;

/// A policy for engine tests with the fakes: short polls and timeouts, two attempts per step.
pub fn fast_policy() -> bluegreen_core::Policy {
    use std::time::Duration;
    bluegreen_core::Policy::default()
        .with_poll(Duration::from_millis(1), Duration::from_millis(5))
        .with_readiness_timeout(Duration::from_millis(500))
        .with_observation(Duration::ZERO, Duration::from_millis(5))
        .with_verify_timeout(Duration::from_millis(500))
        .with_drain_timeout(Duration::from_millis(100))
        .with_retry(bluegreen_core::RetryConfig {
            attempts: 2,
            backoff: Duration::from_millis(10),
        })
}

/// Runs a query returning one i64.
pub async fn one_i64(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// A small application schema: accounts (total balance constant), orders (insert-only, FK),
/// a counter kept equal to the number of orders, a sequence, a view, a quoted mixed-case name.
pub const SEED: &str = "
CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL);
INSERT INTO accounts SELECT g, 1000 FROM generate_series(1, 100) g;
CREATE TABLE orders (id bigserial PRIMARY KEY, account int NOT NULL REFERENCES accounts(id),
                     amount bigint NOT NULL, note text);
CREATE INDEX orders_account ON orders (account);
INSERT INTO orders (account, amount, note)
  SELECT 1 + g % 100, g, md5(g::text) FROM generate_series(1, 3000) g;
CREATE TABLE counters (name text PRIMARY KEY, n bigint NOT NULL);
INSERT INTO counters VALUES ('orders', 3000);
CREATE SCHEMA extra;
CREATE TABLE extra.\"Mixed Case\" (k int PRIMARY KEY, v jsonb);
INSERT INTO extra.\"Mixed Case\" SELECT g, jsonb_build_object('g', g) FROM generate_series(1, 200) g;
CREATE VIEW order_totals AS SELECT account, sum(amount) AS total FROM orders GROUP BY account;
";

/// One writer transaction: an order, the counter, a transfer between two accounts.
pub fn write_txn(i: u64) -> String {
    let a = 1 + i % 100;
    let b = 1 + (i * 7 + 3) % 100;
    format!(
        "BEGIN;
         INSERT INTO orders (account, amount, note) VALUES ({a}, {i}, 'w{i}');
         UPDATE counters SET n = n + 1 WHERE name = 'orders';
         UPDATE accounts SET balance = balance - 1 WHERE id = {a};
         UPDATE accounts SET balance = balance + 1 WHERE id = {b};
         COMMIT;"
    )
}

/// Consistency facts of a database holding [`SEED`]: (orders, counter, total balance, max id).
pub async fn facts(c: &Client) -> (i64, i64, i64, i64) {
    let r = c
        .query_one(
            "SELECT (SELECT count(*) FROM orders), (SELECT n FROM counters WHERE name = 'orders'),
                    (SELECT sum(balance)::bigint FROM accounts),
                    (SELECT coalesce(max(id), 0) FROM orders)",
            &[],
        )
        .await
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

/// md5 over the orders with `id <= max_id`, in id order.
pub async fn orders_checksum(c: &Client, max_id: i64) -> String {
    c.query_one(
        "SELECT coalesce(md5(string_agg(o::text, ',' ORDER BY id)), '') FROM orders o WHERE id <= $1",
        &[&max_id],
    )
    .await
    .unwrap()
    .get(0)
}
