{#- Reporting time: the warehouse stores naive UTC timestamps; reports cut periods in var('reporting_timezone'). -#}

{% macro reporting_timezone() -%}
    {{ return(var('reporting_timezone', 'UTC')) }}
{%- endmacro %}


{#- A naive-UTC timestamp as naive local time in the reporting time zone (DST-aware). -#}
{% macro to_reporting_tz(column) -%}
    {{ return(adapter.dispatch('to_reporting_tz', 'oppsync')(column)) }}
{%- endmacro %}

{% macro default__to_reporting_tz(column) -%}
    {%- set tz = reporting_timezone() | replace("'", "''") -%}
    {%- if tz == 'UTC' -%}
        cast({{ column }} as timestamp)
    {%- else -%}
        cast((cast({{ column }} as timestamp) at time zone 'UTC') at time zone '{{ tz }}' as timestamp)
    {%- endif -%}
{%- endmacro %}

{#- DuckDB: the same SQL works once ICU (bundled with the Python package) is loaded. -#}
{% macro duckdb__to_reporting_tz(column) -%}
    {{ return(default__to_reporting_tz(column)) }}
{%- endmacro %}


{#- First day (a date) of the day / week / month containing a local timestamp. Weeks start on Monday
    (ISO weeks: date_trunc('week') is Monday-based in both DuckDB and Postgres). -#}
{% macro period_start(grain, local_ts) -%}
    {%- if grain not in ('day', 'week', 'month') -%}
        {{ exceptions.raise_compiler_error("period grain must be day, week or month, not " ~ grain) }}
    {%- endif -%}
    cast(date_trunc('{{ grain }}', cast({{ local_ts }} as timestamp)) as date)
{%- endmacro %}


{% macro period_grains() -%}
    {{ return(['day', 'week', 'month']) }}
{%- endmacro %}
