"""The outcomes dashboard's logic: filters, read-only warehouse access, the queries over the marts, the charts."""
