{#- marts.opportunity_fields: the connection's extra_fields: (oppsync.yaml), read from the JSON text the sync
    stores (oppsync.opportunities.extra_fields) and typed as configured. A value that does not read as its type
    is NULL, never a failed build, with the same rule on DuckDB and on Postgres (Postgres 15 has no try_cast):
    each cast is guarded by a pattern, then by the calendar (a 30 February is NULL, not an error). -#}

{#- The text of one key of a JSON object (a nested object or array: its JSON text). -#}
{% macro json_key_text(column, key) -%}
    {{ return(adapter.dispatch('json_key_text', 'oppsync')(column, key)) }}
{%- endmacro %}

{% macro default__json_key_text(column, key) -%}
    (cast({{ column }} as json) ->> '{{ key }}')
{%- endmacro %}

{% macro duckdb__json_key_text(column, key) -%}
    json_extract_string({{ column }}, '$."{{ key }}"')
{%- endmacro %}


{#- Whether text matches a regular expression anywhere (Postgres `~`; DuckDB's `~` is a full match). -#}
{% macro regex_found(value, pattern) -%}
    {{ return(adapter.dispatch('regex_found', 'oppsync')(value, pattern)) }}
{%- endmacro %}

{% macro default__regex_found(value, pattern) -%}
    ({{ value }} ~ '{{ pattern }}')
{%- endmacro %}

{% macro duckdb__regex_found(value, pattern) -%}
    regexp_matches({{ value }}, '{{ pattern }}')
{%- endmacro %}


{#- A YYYY-MM-DD prefix that is a real calendar day (its day within its month's length). -#}
{% macro _is_calendar_day(value) -%}
    {{ regex_found(value, '^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])') }}
    and case
        when {{ regex_found(value, '^[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])') }}
            then cast(substr({{ value }}, 9, 2) as integer) <= extract(
                day from cast(cast(substr({{ value }}, 1, 7) || '-01' as date) + interval '1 month' - interval '1 day' as date)
            )
        else false
    end
{%- endmacro %}


{#- One extra field's value, typed: text, number, integer, date, timestamp (UTC, naive) or boolean. -#}
{% macro typed_extra_field(column, key, type) -%}
    {%- set v = "trim(" ~ json_key_text(column, key) ~ ")" -%}
    {%- if type == 'text' -%}
        cast({{ json_key_text(column, key) }} as text)
    {%- elif type == 'number' -%}
        case when {{ regex_found(v, '^[-+]?([0-9]{1,30}([.][0-9]*)?|[.][0-9]+)([eE][-+]?[0-9]{1,2})?$') }}
            then cast({{ v }} as double precision) end
    {%- elif type == 'integer' -%}
        {#- 12 and 12.0 (a CRM that sends every number as a decimal); 12.5 is not an integer -#}
        case when {{ regex_found(v, '^[-+]?[0-9]{1,15}([.]0*)?$') }}
            then cast(cast({{ v }} as double precision) as bigint) end
    {%- elif type == 'date' -%}
        {#- a date, or the date of a date-time as the CRM wrote it -#}
        case when {{ regex_found(v, '^[0-9]{4}-[0-9]{2}-[0-9]{2}($|[T ])') }} and {{ _is_calendar_day(v) }}
            then cast(substr({{ v }}, 1, 10) as date) end
    {%- elif type == 'timestamp' -%}
        {#- ISO 8601 with an optional fraction (to the microsecond) and offset (Z, +hh:mm, +hhmm), as naive UTC; a
            date alone is its midnight -#}
        {%- set iso = '^[0-9]{4}-[0-9]{2}-[0-9]{2}([T ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9]([.][0-9]{1,6})?)?(Z|[+-]([01][0-9]|2[0-3]):?[0-5][0-9])?)?$' -%}
        {%- set local = "replace(regexp_replace(" ~ v ~ ", '(Z|[+-][0-9]{2}:?[0-9]{2})$', ''), 'T', ' ')" -%}
        {%- set zone = "case when " ~ regex_found(v, '[+-][0-9]{2}:?[0-9]{2}$') ~ " then replace(substr(" ~ v ~ ", length(" ~ v ~ ") - 5, 6), ':', '') end" -%}
        case when {{ regex_found(v, iso) }} and {{ _is_calendar_day(v) }}
            then cast(
                cast(case when length({{ v }}) = 10 then {{ v }} || ' 00:00:00'
                          when length({{ local }}) = 16 then {{ local }} || ':00'
                          else {{ local }} end as timestamp)
                - (coalesce(
                    (cast(substr(right({{ zone }}, 4), 1, 2) as integer) * 60 + cast(right({{ zone }}, 2) as integer))
                    * case when {{ zone }} like '%-%' then -1 else 1 end,
                    0
                ) * interval '1 minute')
            as timestamp) end
    {%- elif type == 'boolean' -%}
        case
            when lower({{ v }}) in ('true', 't', 'yes', 'y', '1') then true
            when lower({{ v }}) in ('false', 'f', 'no', 'n', '0') then false
        end
    {%- else -%}
        {%- set known = 'text, number, integer, date, timestamp, boolean' -%}
        {{ exceptions.raise_compiler_error(
            "extra_fields: unknown type '" ~ type ~ "' for '" ~ key ~ "'; types: " ~ known
        ) }}
    {%- endif -%}
{%- endmacro %}
