with

source as (

    select * from {{ source('oppsync', 'user_links') }}

),

renamed as (

    select
        cast(user_id as text) as user_id,
        cast(connection as text) as connection,
        cast(crm_user_id as text) as crm_user_id,
        cast(link_order as integer) as link_order,
        cast(linked_at as timestamp) as linked_at

    from source

)

select * from renamed
