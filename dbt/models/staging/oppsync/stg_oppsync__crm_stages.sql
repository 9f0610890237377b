with

source as (

    select * from {{ source('oppsync', 'crm_stages') }}

),

renamed as (

    select
        cast(connection as text) as connection,
        cast(stage_key as text) as stage_key,
        cast(label as text) as stage_label,
        cast(pipeline as text) as pipeline,
        cast(is_closed as boolean) as is_closed,
        cast(is_won as boolean) as is_won,
        cast(sort_order as integer) as sort_order,
        cast(probability as double precision) as stage_probability,
        cast(category as text) as stage_category

    from source

)

select * from renamed
