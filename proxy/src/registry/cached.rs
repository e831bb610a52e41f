//! Raw SQL that PostgreSQL parses and plans once per connection.
//!
//! `diesel::sql_query` never lets diesel cache its statement, so PostgreSQL
//! parses, analyses and plans it on every call: for the worker's claim and
//! finish (and the run log's insert), about a quarter of the database's CPU
//! during a drain. A [`CachedSql`] is the same text with the same `$n`
//! placeholders, but safe to cache: diesel prepares it once per connection,
//! keyed by its text and the types of its binds. Only fixed text belongs
//! here, never text built from values (each variant would be one more
//! prepared statement, kept for the connection's life).

use diesel::{
    pg::Pg,
    prelude::*,
    query_builder::{AstPass, Query, QueryFragment, QueryId},
    serialize::ToSql,
    sql_types::{HasSqlType, Untyped},
};

/// One bind of a [`CachedSql`].
trait Bind: Send {
    fn push<'b>(&'b self, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()>;
}

struct Typed<ST, U>(U, std::marker::PhantomData<fn() -> ST>);

impl<ST, U> Bind for Typed<ST, U>
where
    Pg: HasSqlType<ST>,
    U: ToSql<ST, Pg> + Send,
{
    fn push<'b>(&'b self, out: &mut AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        out.push_bind_param::<ST, U>(&self.0)
    }
}

/// Fixed SQL text with `$1`, `$2`, ... placeholders (each may appear more
/// than once), bound in order with [`CachedSql::bind`].
pub struct CachedSql<'a> {
    sql: &'static str,
    binds: Vec<Box<dyn Bind + 'a>>,
}

/// Starts a [`CachedSql`].
pub fn cached_sql<'a>(sql: &'static str) -> CachedSql<'a> {
    CachedSql {
        sql,
        binds: Vec::new(),
    }
}

impl<'a> CachedSql<'a> {
    /// Binds the next placeholder (`$1` first).
    pub fn bind<ST: 'a, U>(mut self, value: U) -> Self
    where
        Pg: HasSqlType<ST>,
        U: ToSql<ST, Pg> + Send + 'a,
    {
        self.binds
            .push(Box::new(Typed::<ST, U>(value, std::marker::PhantomData)));
        self
    }
}

impl QueryFragment<Pg> for CachedSql<'_> {
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, Pg>) -> QueryResult<()> {
        // Diesel numbers the placeholders it writes in order, so each `$n`
        // of the text is written as a bind of value n.
        let mut rest = self.sql;
        while let Some(at) = rest.find('$') {
            out.push_sql(&rest[..at]);
            let digits = rest[at + 1..]
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len() - at - 1);
            let n: usize = rest[at + 1..at + 1 + digits].parse().map_err(|_| {
                diesel::result::Error::QueryBuilderError(
                    format!("a `$` without a bind number in: {}", self.sql).into(),
                )
            })?;
            let bind = n
                .checked_sub(1)
                .and_then(|i| self.binds.get(i))
                .ok_or_else(|| {
                    diesel::result::Error::QueryBuilderError(
                        format!(
                            "${n} has no bind ({} bound) in: {}",
                            self.binds.len(),
                            self.sql
                        )
                        .into(),
                    )
                })?;
            bind.push(&mut out)?;
            rest = &rest[at + 1 + digits..];
        }
        out.push_sql(rest);
        Ok(())
    }
}

impl QueryId for CachedSql<'_> {
    type QueryId = ();
    // No static id: diesel keys the prepared statement by its text and bind
    // types instead.
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl Query for CachedSql<'_> {
    type SqlType = Untyped;
}

impl<Conn> RunQueryDsl<Conn> for CachedSql<'_> {}
