//! Statement parameters ([`Value`], [`params!`](crate::params)) and result rows ([`Row`]),
//! the same for SQLite and PostgreSQL.
//!
//! The schema uses three kinds of column on both backends (ADR 1): `BIGINT` integers (times in
//! microseconds, money in minor units, booleans as 0/1), `TEXT`, and `NULL`. A [`Value`] is one
//! of those; a [`Row`] reads them back by column position.

use std::borrow::Cow;

use crate::StoreError;

/// A parameter of a statement: an integer, a text or `NULL`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value<'a> {
    /// SQL `NULL`.
    Null,
    /// An integer (`BIGINT`).
    Int(i64),
    /// A text (`TEXT`).
    Text(Cow<'a, str>),
}

impl From<i64> for Value<'_> {
    fn from(v: i64) -> Self {
        Self::Int(v)
    }
}

impl From<u32> for Value<'_> {
    fn from(v: u32) -> Self {
        Self::Int(i64::from(v))
    }
}

impl From<bool> for Value<'_> {
    /// Booleans are stored as 0/1 on both backends.
    fn from(v: bool) -> Self {
        Self::Int(i64::from(v))
    }
}

impl<'a> From<&'a str> for Value<'a> {
    fn from(v: &'a str) -> Self {
        Self::Text(Cow::Borrowed(v))
    }
}

impl<'a> From<&'a String> for Value<'a> {
    fn from(v: &'a String) -> Self {
        Self::Text(Cow::Borrowed(v.as_str()))
    }
}

impl From<String> for Value<'_> {
    fn from(v: String) -> Self {
        Self::Text(Cow::Owned(v))
    }
}

impl<'a, T: Into<Value<'a>>> From<Option<T>> for Value<'a> {
    fn from(v: Option<T>) -> Self {
        v.map_or(Self::Null, Into::into)
    }
}

/// The parameters of one statement: `params![order_id.to_string(), 3_i64, None::<&str>]`.
/// Each argument becomes a [`Value`] with `Value::from`.
#[macro_export]
macro_rules! params {
    ($($value:expr),* $(,)?) => {
        &[$($crate::Value::from($value)),*][..]
    };
}

/// The parameters of one statement as an owned list (for [`Tx::execute_each`](crate::Tx::execute_each)
/// and friends, which take many).
#[macro_export]
macro_rules! row {
    ($($value:expr),* $(,)?) => {
        ::std::vec![$($crate::Value::from($value)),*]
    };
}

impl rusqlite::ToSql for Value<'_> {
    fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
        use rusqlite::types::{ToSqlOutput, ValueRef};
        Ok(ToSqlOutput::Borrowed(match self {
            Self::Null => ValueRef::Null,
            Self::Int(i) => ValueRef::Integer(*i),
            Self::Text(s) => ValueRef::Text(s.as_bytes()),
        }))
    }
}

impl tokio_postgres::types::ToSql for Value<'_> {
    fn to_sql(
        &self,
        ty: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        use tokio_postgres::types::{IsNull, Type};
        match self {
            Self::Null => Ok(IsNull::Yes),
            // PostgreSQL infers a parameter's type from where it is used; an integer fits
            // whichever integer type that is, or fails loudly when it does not.
            Self::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                _ => Err(format!("an integer parameter cannot be sent as {ty}").into()),
            },
            Self::Text(s) => s.as_ref().to_sql(ty, out),
        }
    }

    fn accepts(ty: &tokio_postgres::types::Type) -> bool {
        use tokio_postgres::types::Type;
        matches!(
            *ty,
            Type::INT8
                | Type::INT4
                | Type::INT2
                | Type::BOOL
                | Type::TEXT
                | Type::VARCHAR
                | Type::BPCHAR
                | Type::NAME
                | Type::UNKNOWN
        )
    }

    tokio_postgres::types::to_sql_checked!();
}

/// One row of a result, read by column position (0-based).
pub struct Row<'r> {
    inner: RowRef<'r>,
}

enum RowRef<'r> {
    Sqlite(&'r rusqlite::Row<'r>),
    Postgres(&'r tokio_postgres::Row),
}

impl<'r> Row<'r> {
    pub(crate) fn sqlite(row: &'r rusqlite::Row<'r>) -> Self {
        Self {
            inner: RowRef::Sqlite(row),
        }
    }

    pub(crate) fn postgres(row: &'r tokio_postgres::Row) -> Self {
        Self {
            inner: RowRef::Postgres(row),
        }
    }

    /// The value of column `idx` as `T` (`i64`, `String`, `bool`, or an `Option` of them for a
    /// column that may be `NULL`).
    pub fn get<T: Column>(&self, idx: usize) -> Result<T, StoreError> {
        T::read(&self.cell(idx)?).map_err(|why| {
            StoreError::Decode(format!(
                "column {idx} ({}): {why}",
                self.name(idx).unwrap_or("?")
            ))
        })
    }

    /// How many columns the row has.
    pub fn len(&self) -> usize {
        match &self.inner {
            RowRef::Sqlite(row) => row.as_ref().column_count(),
            RowRef::Postgres(row) => row.len(),
        }
    }

    /// Whether the row has no columns.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn name(&self, idx: usize) -> Option<&str> {
        match &self.inner {
            RowRef::Sqlite(row) => row.as_ref().column_name(idx).ok(),
            RowRef::Postgres(row) => row.columns().get(idx).map(tokio_postgres::Column::name),
        }
    }

    /// The raw value of column `idx`, whatever its type (for tools that read any table).
    pub fn cell(&self, idx: usize) -> Result<Cell<'_>, StoreError> {
        match &self.inner {
            RowRef::Sqlite(row) => {
                use rusqlite::types::ValueRef;
                Ok(match row.get_ref(idx)? {
                    ValueRef::Null => Cell::Null,
                    ValueRef::Integer(i) => Cell::Int(i),
                    ValueRef::Text(t) => Cell::Text(
                        std::str::from_utf8(t)
                            .map_err(|e| StoreError::Decode(format!("column {idx}: {e}")))?,
                    ),
                    ValueRef::Real(_) | ValueRef::Blob(_) => {
                        return Err(StoreError::Decode(format!(
                            "column {idx} holds a REAL or BLOB, which the schema never stores"
                        )));
                    }
                })
            }
            RowRef::Postgres(row) => {
                use tokio_postgres::types::Type;
                let column = row
                    .columns()
                    .get(idx)
                    .ok_or_else(|| StoreError::Decode(format!("no column {idx} in the result")))?;
                let cell = match *column.type_() {
                    Type::INT8 => row.try_get::<_, Option<i64>>(idx)?.map(Cell::Int),
                    Type::INT4 => row
                        .try_get::<_, Option<i32>>(idx)?
                        .map(|i| Cell::Int(i64::from(i))),
                    Type::INT2 => row
                        .try_get::<_, Option<i16>>(idx)?
                        .map(|i| Cell::Int(i64::from(i))),
                    Type::BOOL => row
                        .try_get::<_, Option<bool>>(idx)?
                        .map(|b| Cell::Int(i64::from(b))),
                    _ => row.try_get::<_, Option<&str>>(idx)?.map(Cell::Text),
                };
                Ok(cell.unwrap_or(Cell::Null))
            }
        }
    }
}

/// A column's value, whichever backend it came from.
#[derive(Debug)]
pub enum Cell<'a> {
    /// `NULL`.
    Null,
    /// An integer.
    Int(i64),
    /// A text.
    Text(&'a str),
}

/// A Rust type a column can be read as (see [`Row::get`]).
pub trait Column: Sized {
    /// Reads the value, or says why it cannot.
    fn read(cell: &Cell<'_>) -> Result<Self, String>;
}

impl Column for i64 {
    fn read(cell: &Cell<'_>) -> Result<Self, String> {
        match cell {
            Cell::Int(i) => Ok(*i),
            other => Err(format!("expected an integer, found {other:?}")),
        }
    }
}

impl Column for bool {
    fn read(cell: &Cell<'_>) -> Result<Self, String> {
        i64::read(cell).map(|i| i != 0)
    }
}

impl Column for String {
    fn read(cell: &Cell<'_>) -> Result<Self, String> {
        match cell {
            Cell::Text(s) => Ok((*s).to_owned()),
            other => Err(format!("expected a text, found {other:?}")),
        }
    }
}

impl<T: Column> Column for Option<T> {
    fn read(cell: &Cell<'_>) -> Result<Self, String> {
        match cell {
            Cell::Null => Ok(None),
            other => T::read(other).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_convert() {
        assert_eq!(Value::from(3_i64), Value::Int(3));
        assert_eq!(Value::from(true), Value::Int(1));
        assert_eq!(Value::from(None::<&str>), Value::Null);
        assert_eq!(Value::from(Some("x")), Value::Text("x".into()));
        assert_eq!(Value::from("x".to_owned()), Value::Text("x".into()));
        let p = params![1_i64, "a", None::<i64>];
        assert_eq!(p.len(), 3);
    }

    #[test]
    fn columns_read_with_clear_errors() {
        assert_eq!(i64::read(&Cell::Int(4)), Ok(4));
        assert_eq!(Option::<i64>::read(&Cell::Null), Ok(None));
        assert_eq!(String::read(&Cell::Text("a")), Ok("a".to_owned()));
        assert!(i64::read(&Cell::Text("a")).unwrap_err().contains("integer"));
        assert!(bool::read(&Cell::Int(1)).unwrap());
    }
}
