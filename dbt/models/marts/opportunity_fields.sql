-- One row per opportunity, with one typed column per configured extra field (oppsync.yaml `extra_fields:`,
-- passed as the `extra_fields` var: column -> type). The columns follow the configuration, so this mart has
-- no enforced contract (see its YAML).
{#- a mapping in dbt; sqlfluff's var() stub is not one (nothing to lint in the generated columns) -#}
{%- set extra_fields = var('extra_fields', {}) -%}
{%- set extra_fields = extra_fields if extra_fields is mapping else {} %}

with

opportunities as (

    select * from {{ ref('stg_oppsync__opportunities') }}

),

final as (

    select
        cast(connection as text) as connection,
        cast(crm as text) as crm,
        cast(source_id as text) as source_id,
        cast(deleted_at is not null as boolean) as is_deleted{% for name, type in extra_fields.items() %},
        {{ typed_extra_field('extra_fields_json', name, type) }} as {{ adapter.quote(name) }}{% endfor %}

    from opportunities

)

select * from final
